"""Admin jobs against a real server: the token, small and long recipes, polling a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from model.run_state import RunState
from tests.helpers.server import Server

TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# DataLoader workers as users run them: cancel and stop must not kill them before the
# trainer has saved.
SMALL = {"dataset": "synthetic:160", "image_size": 64, "batch_size": 16, "epochs": 2,
         "dropout": 0.0, "workers": 2, "activate": "always"}  # fmt: skip
# Long enough to be caught running (and cancelled, killed or interrupted) mid-epoch.
LONG = {**SMALL, "dataset": "synthetic:4000", "epochs": 3}


def api(srv: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers=AUTH, timeout=30, **kw)


def wait_job(srv: Server, job_id: str, until: Callable[[dict[str, Any]], bool],
             timeout_s: float = 180) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = api(srv, "GET", f"/admin/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.1)
    log = api(srv, "GET", f"/admin/jobs/{job_id}/log").text[-3000:]
    raise AssertionError(f"job {job_id} never got there: {job}\n{log}")


def mid_epoch(job: dict[str, Any]) -> bool:
    return bool(job["status"] == "running" and job["progress"]["step"] >= 1)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled", "interrupted")


def training_pids(run_dir: Path) -> list[int]:
    """Processes whose command line names this job's folder (the child, its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmd:
            pids.append(int(entry.name))
    return sorted(pids)


def state_position(run_dir: Path) -> tuple[int, int]:
    """(epoch, step) at which a run's resumable state was saved."""
    state = RunState.read(run_dir)
    return state.epoch, state.step


def classify(srv: Server, photo: Path) -> httpx.Response:
    return httpx.post(srv.url + "/v1/classify", files={"file": (photo.name, photo.read_bytes())},
                      timeout=30)  # fmt: skip
