"""/admin: auth, job validation, queue bounds, job state rules, activation, the SQLite store.

Jobs here are real records in a real SQLite file; the runner may start real children for
them, which each test cancels. Whole training runs are in tests/e2e/test_jobs.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.activation import decide, should_activate
from app.jobs.progress import apply_event
from app.jobs.runner import train_argv
from app.jobs.store import JobStore
from app.schemas import JobOut, JobRequest
from app.settings import Settings
from app.state import AppState
from model.checkpoint import read_active, read_card, write_active
from model.run import EpochEnd, Event, Finished, Start, Step, parse_event
from model.stats import PairedResult
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.cli import REPO
from tests.helpers.versions import make_version

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"dataset": "synthetic:100", "image_size": 64, "batch_size": 32, "epochs": 1,
        "dropout": 0.0, "workers": 0}  # fmt: skip


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True, metrics={"val_top1": 0.5})
    (home / "data" / "flowers" / "rose").mkdir(parents=True)
    (home / "data" / "flowers" / "tulip").mkdir()
    (home / "data" / "mono" / "only").mkdir(parents=True)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "a").mkdir()
    (outside / "b").mkdir()
    (home / "data" / "escape").symlink_to(outside)
    with make_client(home, admin_token=TOKEN, max_queued_jobs=2) as client:
        wait_ready(client)
        yield client


def state_of(client: TestClient) -> AppState:
    state: AppState = client.app.state.alexnet  # type: ignore[attr-defined]
    return state


def test_admin_disabled_without_a_token(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        r = client.get("/admin/jobs", headers=AUTH)
        assert_error(r, 503, "admin_disabled")
        assert "ALEXNET_ADMIN_TOKEN" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"},
                                     {"Authorization": TOKEN}])  # fmt: skip
def test_missing_or_wrong_token_is_401(admin: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/admin/jobs"), ("POST", "/admin/jobs"),
                         ("DELETE", "/admin/jobs/0123456789ab"),
                         ("POST", "/admin/models/x/activate")]:  # fmt: skip
        r = admin.request(method, path, headers=headers, json=TINY)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"


def test_openapi_declares_the_bearer_scheme(admin: TestClient) -> None:
    spec = admin.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    post = spec["paths"]["/admin/jobs"]["post"]
    assert post["security"] == [{"HTTPBearer": []}]
    assert {"202", "401", "422", "429", "503"} <= set(post["responses"])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dataset": "../etc"}, "unknown dataset"),
        ({"dataset": "/etc/passwd"}, "unknown dataset"),
        ({"dataset": "imagefolder:../../etc"}, "unknown dataset"),
        ({"dataset": "imagefolder:/abs"}, "unknown dataset"),
        ({"dataset": "https://example.com/data.tar"}, "unknown dataset"),
        ({"dataset": "imagefolder:missing"}, "does not exist"),
        ({"dataset": "imagefolder:mono"}, "at least 2"),
        ({"dataset": "imagefolder:escape"}, "outside the data dir"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"image_size": 32}, "image_size"),
        ({"patience": 2}, "patience"),
        ({"activate": "sometimes"}, "activate"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"weights_url": "http://x"}, "weights_url"),
    ],
)
def test_invalid_jobs_are_422(admin: TestClient, change: dict[str, object], needle: str) -> None:
    r = admin.post("/admin/jobs", headers=AUTH, json={**TINY, **change})
    assert_error(r, 422, "validation_error")
    assert needle in str(r.json()["error"]), r.json()


def test_missing_body_and_unknown_job(admin: TestClient) -> None:
    assert_error(admin.post("/admin/jobs", headers=AUTH), 422, "validation_error")
    assert_error(admin.get("/admin/jobs/0123456789ab", headers=AUTH), 404, "not_found")
    assert_error(admin.get("/admin/jobs/0123456789ab/losses.png", headers=AUTH), 404, "not_found")
    assert_error(admin.get("/admin/jobs/..%2F..%2Fetc", headers=AUTH), 404, "not_found")
    assert_error(admin.get("/admin/jobs/NOT-AN-ID", headers=AUTH), 422, "validation_error")


def test_queue_is_bounded_and_cancel_rules(admin: TestClient) -> None:
    state = state_of(admin)
    assert state.jobs is not None
    # More queued jobs than allowed (the runner takes at most one of them at a time).
    made = [state.jobs.create(JobRequest.model_validate(TINY)) for _ in range(4)]
    try:
        r = admin.post("/admin/jobs", headers=AUTH, json=TINY)
        assert_error(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        listed = admin.get("/admin/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in listed[:4]] == [j.id for j in reversed(made)]  # newest first
    finally:
        for job in made:
            r = admin.delete(f"/admin/jobs/{job.id}", headers=AUTH)
            assert r.status_code == 200
            assert r.json()["status"] in ("cancelled", "running")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = {admin.get(f"/admin/jobs/{j.id}", headers=AUTH).json()["status"] for j in made}
        if statuses <= {"cancelled", "succeeded"}:
            break
        time.sleep(0.2)
    assert statuses <= {"cancelled", "succeeded"}, statuses
    cancelled = made[-1].id  # never started: cancelled while queued
    assert admin.get(f"/admin/jobs/{cancelled}", headers=AUTH).json()["status"] == "cancelled"
    # Cancelling again is harmless; a cancelled job may resume; a succeeded one may not.
    assert admin.delete(f"/admin/jobs/{cancelled}", headers=AUTH).json()["status"] == "cancelled"
    state.jobs.update(cancelled, status="succeeded")
    assert_error(admin.post(f"/admin/jobs/{cancelled}/resume", headers=AUTH), 409, "conflict")
    assert_error(admin.delete(f"/admin/jobs/{cancelled}", headers=AUTH), 409, "conflict")


def test_activate_unknown_or_broken_version(admin: TestClient, tmp_path: Path) -> None:
    state = state_of(admin)
    serving = state.registry.current
    assert serving is not None
    assert_error(admin.post("/admin/models/nope/activate", headers=AUTH), 404, "not_found")
    assert_error(admin.post("/admin/models/..%2Fmodels/activate", headers=AUTH), 404, "not_found")
    broken = make_version(state.settings.models_dir, seed=3)
    weights = state.settings.models_dir / broken.version / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    r = admin.post(f"/admin/models/{broken.version}/activate", headers=AUTH)
    assert_error(r, 422, "validation_error")
    # Nothing changed: the same model serves, ACTIVE still names it.
    assert state.registry.current is serving
    assert read_active(state.settings.models_dir) == serving.version


def test_activate_and_roll_back(admin: TestClient, jpeg_photos: list[Path]) -> None:
    state = state_of(admin)
    before = state.registry.current
    assert before is not None
    new = make_version(state.settings.models_dir, seed=5)
    r = admin.post(f"/admin/models/{new.version}/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == new.version and r.json()["previous"] == before.version
    assert read_active(state.settings.models_dir) == new.version
    photo = {"file": ("a.jpg", jpeg_photos[0].read_bytes())}
    assert admin.post("/v1/classify", files=photo).json()["model"]["version"] == new.version
    back = admin.post(f"/admin/models/{before.version}/activate", headers=AUTH).json()
    assert back["active"] == before.version and back["previous"] == new.version
    assert admin.post("/v1/classify", files=photo).json()["model"]["version"] == before.version


def test_activation_policy(tmp_path: Path) -> None:
    a = read_card(tmp_path / make_version(tmp_path, metrics={"val_top1": 0.6}).version)
    new = read_card(tmp_path / make_version(tmp_path, metrics={"val_top1": 0.1}).version)
    other = read_card(tmp_path / make_version(tmp_path, num_classes=5,
                                              metrics={"val_top1": 0.9}).version)  # fmt: skip
    # if_better is judged on paired holdout results, not on the cards' val_top1
    clear_win = PairedResult(n=40, candidate_correct=30, other_correct=18, b=14, c=2)
    by_chance = PairedResult(n=40, candidate_correct=21, other_correct=19, b=4, c=2)
    worse = PairedResult(n=40, candidate_correct=10, other_correct=18, b=1, c=9)
    d = decide("if_better", new, a, result=clear_win, alpha=0.05)
    assert d.activate and "0.7500 vs 0.4500" in d.reason and "40 images" in d.reason
    assert d.promotion["p_value"] == pytest.approx(clear_win.p_value)
    assert clear_win.p_value < 0.05
    assert d.promotion["decision"] == "activated" and d.promotion["holdout_size"] == 40
    assert d.promotion["candidate"] == {"version": new.version, "top1": 0.75}
    d = decide("if_better", new, a, result=by_chance, alpha=0.05)
    assert not d.activate and "not by more than chance" in d.reason and "p=0.6875" in d.reason
    assert not should_activate("if_better", new, a, result=worse)[0]
    assert not should_activate("if_better", new, a)[0]  # no comparison could be made
    # trained on other data (these cards record none): the answer says it may favour either
    assert "may favour either side" in decide("if_better", new, a, result=clear_win).reason
    yes, why = should_activate("if_better", other, a)
    assert not yes and "labels differ" in why
    assert should_activate("always", new, a)[0]
    assert not should_activate("never", new, a)[0]
    assert should_activate("never", new, None)[0]  # nothing served: the contract activates


def test_store_survives_reopen_and_replays_events(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "alexnet.db")
    job = store.create(JobRequest.model_validate({**TINY, "epochs": 3}))
    end = {"epoch": 1, "train_loss": 2.0, "val_top1": 0.2, "val_top5": 0.6, "lr": 0.01,
           "grad_norm": 1.0, "images_per_s": 50.0, "epoch_time_s": 1.0, "epochs": 3,
           "improved": True, "early_stop": False, "next_lr": 0.01}  # fmt: skip
    events: list[Event] = [
        Start(config=job.config, labels=["a", "b"], split={"train": 16, "val": 4},
              device={"device": "cpu", "precision": "fp32"}, epochs=3, steps_per_epoch=4),
        Step(epoch=1, epochs=3, step=2, steps=4, loss=2.0, images_per_s=50.0, eta_s=9.0),
        EpochEnd(**end, val_loss=1.9),
        EpochEnd(**end, val_loss=1.8),  # a resumed run repeats an epoch
        Finished(version="v1", metrics={"val_top1": 0.3}, stopped_early=False),
    ]  # fmt: skip
    # As they travel: one JSON line each in events.jsonl
    events = [e for e in (parse_event(ev.model_dump_json()) for ev in events) if e is not None]
    assert len(events) == 5
    for ev in events:
        store.update(job.id, **apply_event(job, ev))
    store.close()
    again = JobStore(tmp_path / "alexnet.db").get(job.id)
    assert again is not None
    assert (again.epochs, again.steps, again.images_per_s) == (3, 4, 50.0)
    assert [h["val_loss"] for h in again.history] == [1.8]
    assert again.result_version == "v1" and again.metrics == {"val_top1": 0.3}
    pub = JobOut.of(again)
    assert pub.progress.eta_s == 0.0 and pub.status == "queued"


def test_a_resumed_start_brings_the_epochs_its_state_finished(tmp_path: Path) -> None:
    """The stopped attempt saved epoch 2 but died before telling its end: the resumed
    run's start carries the state's history, so the record has both epochs (epoch 1 as
    told, with `improved`)."""
    store = JobStore(tmp_path / "alexnet.db")
    job = store.create(JobRequest.model_validate({**TINY, "epochs": 3}))
    line = {"train_loss": 2.0, "val_loss": 1.9, "val_top1": 0.2, "val_top5": 0.6, "lr": 0.01,
            "grad_norm": 1.0, "images_per_s": 50.0, "epoch_time_s": 1.0}  # fmt: skip
    start = {"config": job.config, "labels": ["a", "b"], "split": {"train": 16, "val": 4},
             "device": {"device": "cpu", "precision": "fp32"}, "epochs": 3,
             "steps_per_epoch": 4}  # fmt: skip
    told = EpochEnd(**line, epoch=1, epochs=3, improved=True, early_stop=False, next_lr=0.01)
    resumed = Start(
        **start,
        resumed_from=(3, 0),
        history=[{**line, "epoch": 1}, {**line, "epoch": 2, "val_loss": 1.7}],
    )  # type: ignore[list-item]
    for ev in (Start(**start), told, resumed):
        store.update(job.id, **apply_event(job, parse_event(ev.model_dump_json())))  # type: ignore[arg-type]
    again = store.get(job.id)
    assert again is not None
    assert [(h["epoch"], h["val_loss"], h.get("improved")) for h in again.history] == [
        (1, 1.9, True), (2, 1.7, None)]  # fmt: skip


def test_train_argv_is_the_cli(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db")
    job = store.create(JobRequest.model_validate({**TINY, "augment": False, "nproc_per_node": 2}))
    argv = train_argv(job, tmp_path / "run")
    assert argv[1:4] == ["-m", "app.cli", "train"]
    joined = " ".join(argv)
    for part in ("--dataset synthetic:100", "--image-size 64", "--no-augment",
                 "--nproc-per-node 2", "--keep-active", f"--run-dir {tmp_path / 'run'}"):  # fmt: skip
        assert part in joined
    assert "--writer-tag" in argv  # names its temp files after the job (app/jobs/child.py)
    assert "--nnodes" not in argv and "--max-restarts" not in argv and job.launch is None
    elastic = store.create(JobRequest.model_validate(
        {**TINY, "nproc_per_node": 2, "max_restarts": 3, "nnodes": "1:2",
         "rdzv_endpoint": "head:29400", "checkpoint_every_steps": 20}))  # fmt: skip
    assert elastic.launch == {"nnodes": "1:2", "max_restarts": 3, "rdzv_endpoint": "head:29400"}
    assert store.get(elastic.id).launch == elastic.launch  # type: ignore[union-attr]
    joined = " ".join(train_argv(elastic, tmp_path / "run"))
    for part in ("--nnodes 1:2", "--max-restarts 3", "--rdzv-endpoint head:29400",
                 "--checkpoint-every-steps 20"):  # fmt: skip
        assert part in joined
    assert JobOut.of(elastic).launch == elastic.launch
    for bad, field in (({"nnodes": "2:1x"}, "nnodes"), ({"max_restarts": -1}, "max_restarts"),
                       ({"rdzv_endpoint": "no port"}, "rdzv_endpoint"),
                       ({"nnodes": "2"}, "rdzv_endpoint"),
                       ({"nnodes": "3:2", "rdzv_endpoint": "h:1"}, "nnodes")):  # fmt: skip
        with pytest.raises(ValidationError) as info:
            JobRequest.model_validate({**TINY, **bad})
        assert [e["loc"] for e in info.value.errors()] == [(field,)], (bad, info.value)
    job.resume = True
    assert "--resume" in train_argv(job, tmp_path / "run")
    assert "--dataset" not in train_argv(job, tmp_path / "run")


def test_replicas_follow_active_on_disk(tmp_path: Path) -> None:
    """A replica that runs no jobs serves what another process activates."""
    first = make_version(tmp_path / "models", activate=True)
    with make_client(tmp_path, run_jobs=False, watch_active_s=0.1) as client:
        wait_ready(client)
        state = state_of(client)
        assert state.runner is not None and state.runner._task is None  # no runner here
        second = make_version(tmp_path / "models", seed=9)
        write_active(tmp_path / "models", second.version)  # e.g. the replica running jobs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if client.get("/v1/models").json()["serving"] == second.version:
                break
            time.sleep(0.05)
        assert client.get("/v1/models").json()["serving"] == second.version != first.version


def test_env_example_documents_every_setting() -> None:
    text = (REPO / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"ALEXNET_{name.upper()}=" in text, name


def test_readme_documents_every_setting() -> None:
    text = (REPO / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`ALEXNET_{n.upper()}`" not in text]
    assert missing == []
