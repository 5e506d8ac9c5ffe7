"""Admin training jobs end to end: a real server and real `alexnet train` children.

Each job is a small synthetic run (a few seconds of training at 64 px) so the suite stays
short; what is checked is the plumbing: progress, results, activation, cancel, resume and
queueing. Killed children, restarts and hot swaps are in tests/faults."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import read_active
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

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(home: Path) -> Iterator[Server]:
    make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    with Server(home, ALEXNET_ADMIN_TOKEN=TOKEN, ALEXNET_JOB_THREADS="1") as srv:
        yield srv


def test_job_runs_registers_and_activates(server: Server, jpeg_photos: list[Path]) -> None:
    before = read_active(server.home / "models")
    r = api(server, "POST", "/admin/jobs", json=SMALL)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["config"]["dataset"] == "synthetic:160"
    seen: Counter[str] = Counter()

    def watch(j: dict[str, Any]) -> bool:
        seen[j["status"]] += 1
        if j["status"] == "running" and j["progress"]["step"]:
            seen["progress"] += 1
        return finished(j)

    done = wait_job(server, job["id"], watch)
    assert done["status"] == "succeeded", done
    assert seen["running"] and seen["progress"], seen  # progress was visible while it ran
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "val_top5", "lr"} <= set(done["history"][0])
    assert done["progress"]["epochs"] == 2 and done["progress"]["images_per_s"] > 0
    version = done["result_version"]
    assert done["activated"] and "always" in done["activation"]
    assert read_active(server.home / "models") == version != before
    card = httpx.get(server.url + "/v1/models/active").json()
    # lineage: trained from scratch, so no parent (whatever was served meanwhile)
    assert card["version"] == version and card["parent"] is None
    assert card["dataset"] == "synthetic:160" and card["image_size"] == 64
    assert classify(server, jpeg_photos[0]).json()["model"]["version"] == version
    png = api(server, "GET", f"/admin/jobs/{job['id']}/losses.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "saved version" in api(server, "GET", f"/admin/jobs/{job['id']}/log").text
    assert (server.home / "jobs" / job["id"] / "events.jsonl").is_file()
    # Retention (ALEXNET_KEEP_JOB_STATE): a succeeded run can never continue, so its
    # ~460 MB of resumable state goes; the record, log, events and plot stay.
    wait_job(server, job["id"], lambda j: j["state_purged"])
    assert not (server.home / "jobs" / job["id"] / "state.safetensors").exists()


def test_queue_cancel_queued_and_running_then_resume(server: Server) -> None:
    first = api(server, "POST", "/admin/jobs", json=LONG).json()
    second = api(server, "POST", "/admin/jobs", json=SMALL).json()
    wait_job(server, first["id"], mid_epoch)
    # One runs at a time: the second waits.
    assert api(server, "GET", f"/admin/jobs/{second['id']}").json()["status"] == "queued"
    gone = api(server, "DELETE", f"/admin/jobs/{second['id']}")
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled"

    api(server, "DELETE", f"/admin/jobs/{first['id']}")
    cancelled = wait_job(server, first["id"], finished)
    assert cancelled["status"] == "cancelled", cancelled
    run_dir = server.home / "jobs" / first["id"]
    assert (run_dir / "state.safetensors").is_file()
    assert not list(run_dir.glob("*.tmp*"))  # no half-written file
    # The trainer saved where it stopped (mid-epoch), and its workers did not crash it.
    assert state_position(run_dir)[1] >= 1
    log = (run_dir / "train.log").read_text()
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    assert training_pids(run_dir) == []
    # The cancelled queued job never ran.
    assert api(server, "GET", f"/admin/jobs/{second['id']}").json()["attempts"] == 0

    r = api(server, "POST", f"/admin/jobs/{first['id']}/resume")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    resumed = wait_job(server, first["id"], lambda j: j["attempts"] == 2 and mid_epoch(j))
    assert resumed["progress"]["epoch"] == cancelled["progress"]["epoch"]  # same epoch, not 1
    api(server, "DELETE", f"/admin/jobs/{first['id']}")
    assert wait_job(server, first["id"], finished)["status"] == "cancelled"
