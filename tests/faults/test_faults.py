"""The fault suite: real processes, real files, real signals.

Each fault is injected into a running service and each test asserts the same four things
(`assert_recovered` and `Load`): exactly one response per request, no job record lost, no
half-written file, and recovery without a human.

- the training child killed mid-epoch (SIGKILL);
- the server stopped mid-job (SIGTERM), then killed mid-job (SIGKILL), restarted each time;
- the disk full while a job saves its state (a 32 MB tmpfs);
- a corrupt ACTIVE version at startup, and every version corrupt;
- SIGTERM under load;
- a hot swap under load.

Run just these with `pytest -m fault`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import load_version, read_active
from tests.helpers.disks import small_tmpfs
from tests.helpers.jobs import (
    LONG,
    SMALL,
    TOKEN,
    api,
    classify,
    finished,
    mid_epoch,
    state_position,
    training_pids,
    wait_job,
)
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ENV = {"ALEXNET_ADMIN_TOKEN": TOKEN, "ALEXNET_JOB_THREADS": "1"}


# ---------------------------------------------------------------------------- checks


def half_written(home: Path) -> list[str]:
    """Temp files and folders of interrupted saves anywhere in the service's home."""
    return sorted(str(p.relative_to(home)) for p in home.rglob(".tmp-*"))


def assert_recovered(srv: Server, job_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """No half-written file, every job record still there and settled (nothing claims to
    run without a process), and the service ready and answering. Returns the jobs."""
    assert half_written(srv.home) == []
    assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    listed = {
        j["id"]: j for j in api(srv, "GET", "/admin/jobs", params={"limit": 100}).json()["jobs"]
    }
    assert set(job_ids) <= set(listed), set(job_ids) - set(listed)
    for job in listed.values():
        if job["status"] == "running":
            assert training_pids(srv.home / "jobs" / job["id"]), f"{job['id']} runs nothing"
    return [listed[i] for i in job_ids]


class Load:
    """Threads that post photos until stopped. Every request is counted when sent and its
    outcome (a status, or the exception that replaced it) when it ends: exactly one each."""

    def __init__(self, srv: Server, photos: list[Path], threads: int = 4) -> None:
        self.srv, self.photos = srv, [p.read_bytes() for p in photos[:threads]]
        self.sent = 0
        self.outcomes: list[tuple[int | str, str | None]] = []  # (status or error, version)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d,)) for d in self.photos]

    def _run(self, data: bytes) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                with self._lock:
                    self.sent += 1
                try:
                    r = c.post(self.srv.url + "/v1/classify", files={"file": ("p.jpg", data)})
                    version = r.json()["model"]["version"] if r.status_code == 200 else None
                    outcome: tuple[int | str, str | None] = (r.status_code, version)
                except httpx.HTTPError as exc:
                    outcome = (type(exc).__name__, None)
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a request never ended"
        assert len(self.outcomes) == self.sent  # exactly one outcome per request

    def codes(self) -> Counter[int | str]:
        return Counter(code for code, _ in self.outcomes)


@pytest.fixture
def server(home: Path) -> Iterator[Server]:
    make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    with Server(home, **ENV) as srv:
        yield srv


# ----------------------------------------------------------------------- training faults


def test_killed_child_fails_the_job_not_the_service(
    server: Server, jpeg_photos: list[Path]
) -> None:
    job = api(server, "POST", "/admin/jobs", json=LONG).json()
    queued = api(server, "POST", "/admin/jobs", json={**SMALL, "activate": "never"}).json()
    wait_job(server, job["id"], mid_epoch)
    pids = training_pids(server.home / "jobs" / job["id"])
    assert pids
    with Load(server, jpeg_photos) as load:
        os.kill(pids[0], signal.SIGKILL)  # the `alexnet train` child itself
        failed = wait_job(server, job["id"], finished)
    assert load.codes() == Counter({200: load.sent}), load.codes()
    assert failed["status"] == "failed" and "SIGKILL" in failed["error"], failed
    # Recovery without a human: the queued job runs next and succeeds.
    done = wait_job(server, queued["id"], finished)
    assert done["status"] == "succeeded" and not done["activated"]
    assert "never" in done["activation"]
    assert_recovered(server, [job["id"], queued["id"]])
    assert classify(server, jpeg_photos[0]).status_code == 200


def test_server_stopped_then_killed_mid_job_interrupts_and_resumes(home: Path) -> None:
    make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    spec = {**SMALL, "dataset": "synthetic:640", "epochs": 2}
    srv = Server(home, **ENV).start()
    try:
        job = api(srv, "POST", "/admin/jobs", json=spec).json()
        waiting = api(srv, "POST", "/admin/jobs", json=SMALL).json()
        run_dir = home / "jobs" / job["id"]
        wait_job(srv, job["id"], mid_epoch)
        # A graceful stop: the child saves its state, the job is interrupted.
        # (uvicorn re-raises the SIGTERM it handled once shutdown is complete)
        assert srv.terminate(timeout_s=30) in (0, -signal.SIGTERM)
        assert training_pids(run_dir) == []
        # It saved where it stopped; its DataLoader workers did not crash it first.
        assert state_position(run_dir) != (0, 0)
        log = (run_dir / "train.log").read_text()
        assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    finally:
        srv.__exit__(None, None, None)
    srv = Server(home, **ENV).start()
    try:
        stopped, still_queued = assert_recovered(srv, [job["id"], waiting["id"]])
        assert stopped["status"] == "interrupted" and "resume" in stopped["error"], stopped
        assert still_queued["status"] in ("queued", "running", "succeeded"), still_queued
        api(srv, "DELETE", f"/admin/jobs/{waiting['id']}")  # keep the runner for the resume
        wait_job(srv, waiting["id"], finished)
        assert api(srv, "POST", f"/admin/jobs/{job['id']}/resume").status_code == 202
        wait_job(srv, job["id"], lambda j: j["attempts"] == 2 and mid_epoch(j))
        # Now a crash: SIGKILL the server. The child is told by the kernel, saves, exits.
        assert srv.proc is not None
        srv.proc.kill()
        srv.proc.wait(10)
        deadline = time.monotonic() + 60
        while training_pids(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert training_pids(run_dir) == []  # no orphan kept training
    finally:
        srv.__exit__(None, None, None)
    srv = Server(home, **ENV).start()
    try:
        (crashed,) = assert_recovered(srv, [job["id"]])
        assert crashed["status"] == "interrupted", crashed
        assert api(srv, "POST", f"/admin/jobs/{job['id']}/resume").status_code == 202
        done = wait_job(srv, job["id"], finished)
        assert done["status"] == "succeeded" and done["attempts"] == 3, done
        assert [h["epoch"] for h in done["history"]] == [1, 2]
        assert read_active(home / "models") == done["result_version"]
        assert_recovered(srv, [job["id"], waiting["id"]])
    finally:
        srv.__exit__(None, None, None)


@pytest.fixture
def small_disk(home: Path) -> Iterator[Path]:
    """`home/jobs` on a 32 MB tmpfs: a job's first state save (~460 MB) cannot fit."""
    with small_tmpfs(home / "jobs", "32m") as jobs:
        yield jobs


def test_disk_full_fails_the_job_clearly_and_keeps_the_old_version(
    home: Path, small_disk: Path, jpeg_photos: list[Path]
) -> None:
    old = make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    with Server(home, **ENV) as srv:
        job = api(srv, "POST", "/admin/jobs", json={**SMALL, "epochs": 1}).json()
        with Load(srv, jpeg_photos, threads=2) as load:
            done = wait_job(srv, job["id"], finished)
        assert load.codes() == Counter({200: load.sent}), load.codes()
        assert done["status"] == "failed", done
        assert "No space left on device" in done["error"], done["error"]
        # Nothing half-written is left, the served and the stored versions are intact.
        assert_recovered(srv, [job["id"]])
        assert read_active(home / "models") == old.version
        load_version(home / "models" / old.version)
        r = classify(srv, jpeg_photos[0])
        assert r.status_code == 200 and r.json()["model"]["version"] == old.version
        # The runner goes on: the next job is accepted and queued or running.
        nxt = api(srv, "POST", "/admin/jobs", json={**SMALL, "epochs": 1})
        assert nxt.status_code == 202
        api(srv, "DELETE", f"/admin/jobs/{nxt.json()['id']}")


# ------------------------------------------------------------------------ serving faults


def test_corrupt_active_version_at_startup(home: Path, jpeg_photos: list[Path]) -> None:
    """A corrupt ACTIVE version: the service starts on the previous good one. Every
    version corrupt: it stays up, not ready (no crash loop), and trains and serves its
    built-in model by itself."""
    models = home / "models"
    good = make_version(models, metrics={"val_top1": 0.1})
    bad = make_version(models, seed=1, activate=True)
    weights = models / bad.version / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with Server(home, **ENV) as srv:
        assert httpx.get(srv.url + "/readyz").json()["version"] == good.version
        r = classify(srv, jpeg_photos[0])
        assert r.status_code == 200 and r.json()["model"]["version"] == good.version
        assert read_active(models) == bad.version  # not rewritten behind the operator's back
        assert f"cannot serve version {bad.version}" in srv.log.read_text()
        assert_recovered(srv)

    (models / good.version / "model.json").write_text("{not json")
    srv = Server(home, **ENV, ALEXNET_BOOTSTRAP="synthetic",
                 ALEXNET_BOOTSTRAP_DATASET="synthetic:200", ALEXNET_BOOTSTRAP_EPOCHS="1")  # fmt: skip
    with srv.start(wait_ready=False):
        r = classify(srv, jpeg_photos[0])
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
        assert int(r.headers["Retry-After"]) >= 1
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503 and "training the built-in model" in ready.text, ready.text
        deadline = time.monotonic() + 300
        while httpx.get(srv.url + "/readyz").status_code != 200:
            assert srv.proc is not None and srv.proc.poll() is None, "the service exited"
            assert time.monotonic() < deadline, srv.log.read_text()[-3000:]
            time.sleep(0.5)
        r = classify(srv, jpeg_photos[0])
        assert r.status_code == 200
        assert r.json()["model"]["version"] not in (good.version, bad.version)
        assert_recovered(srv)


def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, jpeg_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True, num_classes=1000, image_size=224)
    data = jpeg_photos[0].read_bytes()
    srv = Server(
        home, ALEXNET_MAX_BATCH_SIZE="4", ALEXNET_PRECISION="fp32", ALEXNET_MAX_QUEUE_WAIT_S="0"
    ).start()  # all 12 accepted, however slow the CPU

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.create_task(c.post(srv.url + "/v1/classify", files={"file": ("a.jpg", data)}))
                     for _ in range(12)]  # fmt: skip
            await _until_decoded(c, srv.url, 12)  # all 12 accepted: queued, running or done
            t0 = time.monotonic()
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
            await asyncio.to_thread(srv.proc.wait, 15)
            return list(results), time.monotonic() - t0

    try:
        results, took = asyncio.run(scenario())
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.proc.kill()
    assert [r.status_code for r in results] == [200] * 12  # one answer each, all good
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: exit status 143
    assert srv.proc is not None and srv.proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in srv.log.read_text()
    # The drain is bounded by ALEXNET_SHUTDOWN_TIMEOUT_S (8 s); this is a generous timeout
    # for a loaded 2-core machine, not a speed measurement.
    assert took < 20
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz")
    assert half_written(home) == []
    # and it comes back by itself on the same files
    with Server(home, ALEXNET_PRECISION="fp32") as again:
        assert httpx.post(again.url + "/v1/classify", files={"file": ("a.jpg", data)},
                          timeout=30).status_code == 200  # fmt: skip


async def _until_decoded(c: httpx.AsyncClient, url: str, n: int, timeout_s: float = 60) -> None:
    """Until the server has decoded (and so queued) `n` uploads, read from /metrics."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = (await c.get(url + "/metrics")).text
        for line in text.splitlines():
            decoded = line.startswith('alexnet_stage_seconds_count{stage="decode"}')
            if decoded and float(line.split()[-1]) >= n:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the server never decoded {n} uploads")


def test_hot_swap_under_load_fails_no_request(server: Server, jpeg_photos: list[Path]) -> None:
    models = server.home / "models"
    a = read_active(models)
    b = make_version(models, seed=11).version
    with Load(server, jpeg_photos) as load:
        time.sleep(1.0)
        for target in (b, a, b):
            r = api(server, "POST", f"/admin/models/{target}/activate")
            assert r.status_code == 200, r.text
            n = len(load.outcomes)
            time.sleep(0.7)
            assert {v for _, v in load.outcomes[n + 8 :]} <= {target}  # later batches: the new one
    assert load.codes() == Counter({200: load.sent}), load.codes()
    assert {v for _, v in load.outcomes} == {a, b}
    assert read_active(models) == b
    assert_recovered(server)
