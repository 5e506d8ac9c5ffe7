"""Faults with real processes and real files: the disk fills up under a training job."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.checkpoint import load_version, read_active
from tests.conftest import make_version
from tests.e2e.server import Server
from tests.e2e.test_jobs import SMALL, TOKEN, api, finished, wait_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def small_disk(home: Path) -> Iterator[Path]:
    """`home/jobs` on a 32 MB tmpfs: a job's first state save (~460 MB) cannot fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    jobs = home / "jobs"
    jobs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(jobs)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield jobs
    finally:
        subprocess.run(["umount", "-l", str(jobs)], check=False)


def test_disk_full_fails_the_job_clearly_and_keeps_the_old_version(
    home: Path, small_disk: Path, jpeg_photos: list[Path]
) -> None:
    old = make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    with Server(home, ALEXNET_ADMIN_TOKEN=TOKEN, ALEXNET_JOB_THREADS="1") as srv:
        job = api(srv, "POST", "/admin/jobs", json={**SMALL, "epochs": 1}).json()
        done = wait_job(srv, job["id"], finished)
        assert done["status"] == "failed", done
        assert "No space left on device" in done["error"], done["error"]
        # Nothing half-written is left, the served and the stored versions are intact.
        assert not [p for p in small_disk.rglob("*") if p.name.startswith(".tmp")]
        assert read_active(home / "models") == old.version
        load_version(home / "models" / old.version)
        photo = jpeg_photos[0]
        r = httpx.post(srv.url + "/v1/classify", files={"file": (photo.name, photo.read_bytes())},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["model"]["version"] == old.version
        # The runner goes on: the next job is accepted and queued or running.
        nxt = api(srv, "POST", "/admin/jobs", json={**SMALL, "epochs": 1})
        assert nxt.status_code == 202
        api(srv, "DELETE", f"/admin/jobs/{nxt.json()['id']}")
