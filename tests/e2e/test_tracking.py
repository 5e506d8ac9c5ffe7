"""Runs on record in MLflow and TensorBoard (model/tracking.py), against a real `mlflow
server` on a SQLite backend with a local artifact folder, started here; TensorBoard's
event files read back with TensorBoard's own reader. A tracking server that does not
answer never fails or stalls a run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import list_cards
from model.run import PLOT_FILE
from tests.helpers.cli import run_cli
from tests.helpers.jobs import SMALL, TOKEN, api, finished, wait_job
from tests.helpers.server import Server, free_port
from tests.helpers.versions import make_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST = ["--image-size", "64", "--precision", "fp32", "--device", "cpu", "--workers", "0",
        "--batch-size", "16", "--epochs", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n"
                                     + (root / "server.log").read_text()[-3000:])  # fmt: skip
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_cli_run_is_an_mlflow_run_and_a_tensorboard_log(mlflow_url: str, tmp_path: Path) -> None:
    home, run_dir, ev_file = tmp_path / "home", tmp_path / "run", tmp_path / "events.jsonl"
    r = run_cli("train", "--dataset", "synthetic:160", *FAST, "--run-dir", str(run_dir),
                "--events-file", str(ev_file), "--mlflow-uri", mlflow_url,
                "--mlflow-experiment", "tracking-test", "--tensorboard", home=home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (card,) = list_cards(home / "models")
    evs = events(ev_file)
    start = next(e for e in evs if e["type"] == "start")
    news = {e["backend"]: e for e in evs if e["type"] == "tracking"}
    assert news["mlflow"]["status"] == "ok" and news["tensorboard"]["status"] == "ok", news
    assert "mlflow: run" in r.stdout

    # MLflow: the run, its params, per-epoch metrics with their step, tags and artifacts.
    c = client(mlflow_url)
    exp = c.get_experiment_by_name("tracking-test")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.run_id == news["mlflow"]["detail"]["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    p = run.data.params
    assert p["arch"] == "alexnet" and p["epochs"] == "2" and p["lr"] == "0.01"
    assert p["dataset"] == "synthetic:160" and p["dataset_hash"] == card.dataset_hash
    assert p["device.device"] == "cpu" and p["device.precision"] == "fp32"
    assert p["machine.cpu"] and p["split.train"] == str(start["split"]["train"])
    assert run.data.tags["alexnet.version"] == card.version
    assert run.data.tags["alexnet.sha256"] == card.sha256
    for name in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        history = c.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    val_loss = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val_loss")}
    epochs = [e for e in evs if e["type"] == "epoch_end"]
    assert val_loss == {e["epoch"]: pytest.approx(e["val_loss"]) for e in epochs}
    assert run.data.metrics["best_val_top1"] == pytest.approx(card.metrics["val_top1"])
    if card.calibration:
        assert run.data.metrics["calibration_temperature"] == pytest.approx(
            card.calibration["temperature"])  # fmt: skip
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {PLOT_FILE, "model.json"} <= artifacts
    if (home / "models" / card.version / "reliability.png").exists():
        assert "reliability.png" in artifacts
    saved = json.loads(Path(c.download_artifacts(run.info.run_id, "model.json", str(tmp_path))
                            ).read_text())  # fmt: skip
    assert saved["sha256"] == card.sha256

    # TensorBoard: read back with its own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    steps = start["steps_per_epoch"] * 2
    tags = acc.Tags()
    assert [s.step for s in acc.Scalars("train/loss")] == list(range(1, steps + 1))
    assert len(acc.Scalars("train/lr")) == steps
    assert [s.step for s in acc.Scalars("epoch/val_loss")] == [1, 2]
    assert [s.value for s in acc.Scalars("epoch/val_top1")] == pytest.approx(
        [e["val_top1"] for e in epochs])  # fmt: skip
    assert "val/images" in tags["images"]
    assert [i.step for i in acc.Images("val/images")] == [1, 2]
    assert "val/answers/text_summary" in tags["tensors"]
    table = acc.Tensors("val/answers/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| image | label | answer | confidence | right |" in table


def test_a_resumed_run_whose_mlflow_run_was_deleted_goes_on_in_a_new_one(
    mlflow_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped (the MLflow run marked KILLED), its MLflow run deleted in the UI, resumed:
    a new MLflow run, recorded for the next resume, instead of a failure."""
    from model import tracking
    from model.run import Interrupted, Start
    from model.tracking import MLflowTracker

    monkeypatch.setattr(tracking, "STOP_WAIT_S", 120.0)  # (a stop's wait: the server is up)

    start = Start(config={"dataset": "synthetic", "arch": "alexnet"}, labels=["a", "b"],
                  split={"train": 8, "val": 2}, device={"device": "cpu", "precision": "fp32"},
                  epochs=2, steps_per_epoch=2)  # fmt: skip
    first = MLflowTracker(mlflow_url, run_dir=tmp_path, models_dir=tmp_path,
                          experiment="resumed", timeout_s=60)  # fmt: skip
    first.handle(start)
    first.handle(Interrupted(epoch=1, step=1, run_dir=str(tmp_path)))
    assert first.error is None and first.run_id is not None
    c = client(mlflow_url)
    assert c.get_run(first.run_id).info.status == "KILLED"
    c.delete_run(first.run_id)

    again = MLflowTracker(mlflow_url, run_dir=tmp_path, models_dir=tmp_path,
                          experiment="resumed", timeout_s=60)  # fmt: skip
    news = again.handle(start.model_copy(update={"resumed_from": (1, 1)}))
    news += again.handle(Interrupted(epoch=1, step=2, run_dir=str(tmp_path)))
    assert [n.status for n in news] == ["ok"]  # type: ignore[union-attr]
    assert again.error is None
    assert again.run_id not in (None, first.run_id)
    assert json.loads((tmp_path / "mlflow.json").read_text())["run_id"] == again.run_id
    assert c.get_run(again.run_id).info.lifecycle_stage == "active"


def _silent_server() -> socket.socket:
    """A port that takes connections and never answers: the slowest tracking server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_a_tracking_server_that_never_answers_neither_fails_nor_stalls_the_run(
    tmp_path: Path,
) -> None:
    home, run_dir, ev_file = tmp_path / "home", tmp_path / "run", tmp_path / "events.jsonl"
    with _silent_server() as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        # Each request would wait 10 minutes for an answer; the run waits 2 s at its end.
        r = run_cli("train", "--dataset", "synthetic:160", *FAST, "--run-dir", str(run_dir),
                    "--events-file", str(ev_file), home=home, timeout=300,
                    env={"ALEXNET_MLFLOW_TRACKING_URI": url, "ALEXNET_MLFLOW_TIMEOUT_S": "2",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "600"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(list_cards(home / "models")) == 1
    evs = events(ev_file)
    assert [e["epoch"] for e in evs if e["type"] == "epoch_end"] == [1, 2]
    (news,) = [e for e in evs if e["type"] == "tracking"]
    assert news["backend"] == "mlflow" and news["status"] == "failed"
    assert "took more than 2 s" in news["error"]
    assert "mlflow tracking failed, training goes on without it" in r.stderr
    # The end of the run comes last: the job record has the news before it.
    assert [e["type"] for e in evs][-2:] == ["tracking", "finished"]


def test_an_admin_job_is_an_mlflow_run_tagged_with_the_job(mlflow_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    with Server(home, ALEXNET_ADMIN_TOKEN=TOKEN, ALEXNET_MLFLOW_TRACKING_URI=mlflow_url,
                ALEXNET_MLFLOW_EXPERIMENT="jobs", ALEXNET_JOB_THREADS="1") as srv:  # fmt: skip
        cfg = {k: v for k, v in SMALL.items() if k != "activate"}
        r = api(srv, "POST", "/admin/jobs", json={**cfg, "workers": 0, "activate": "never"})
        assert r.status_code == 202, r.text
        job = wait_job(srv, r.json()["id"], finished)
        assert job["status"] == "succeeded", job
    tracked = job["tracking"]["mlflow"]
    assert tracked["status"] == "ok" and tracked["uri"] == mlflow_url and tracked["error"] is None
    run = client(mlflow_url).get_run(tracked["run_id"])
    assert run.data.tags["alexnet.job_id"] == job["id"]
    assert run.data.tags["alexnet.version"] == job["result_version"]
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
