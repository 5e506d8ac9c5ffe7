"""Disk use through the API: version sizes, deleting versions (never one in use), purging
a finished job's state, and the retention policy. Real files, a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.store import Job, JobStore
from app.schemas import JobRequest
from app.state import AppState
from app.storage import retain_job_state, tree_bytes
from model.checkpoint import write_active
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import make_version

TOKEN = "storage-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATE_BYTES = 3 * 1024 * 1024


def state_of(client: TestClient) -> AppState:
    state: AppState = client.app.state.alexnet  # type: ignore[attr-defined]
    return state


def make_job(jobs: JobStore, home: Path, status: str, *, base: str | None = None,
             with_state: bool = True) -> Job:  # fmt: skip
    job = jobs.create(JobRequest(dataset="synthetic", image_size=64, base=base))
    jobs.update(job.id, status=status)
    if with_state:
        run = home / "jobs" / job.id
        run.mkdir(parents=True)
        (run / "state.safetensors").write_bytes(b"\0" * STATE_BYTES)
        (run / "best.safetensors").write_bytes(b"\0" * 1000)
        (run / "train.log").write_text("the log stays\n")
    fresh = jobs.get(job.id)
    assert fresh is not None
    return fresh


@pytest.fixture
def served(home: Path) -> Iterator[TestClient]:
    make_version(home / "models", activate=True)
    with make_client(home, admin_token=TOKEN, run_jobs=False, watch_active_s=0) as client:
        wait_ready(client)
        yield client


def test_versions_list_their_size(served: TestClient, home: Path) -> None:
    [v] = served.get("/v1/models").json()["versions"]
    assert v["size_bytes"] == tree_bytes(home / "models" / v["version"]) > 200_000_000


def test_delete_refuses_what_is_in_use_and_frees_the_rest(served: TestClient, home: Path) -> None:
    models = home / "models"
    state = state_of(served)
    assert state.jobs is not None
    served_v = state.registry.current.version  # type: ignore[union-attr]
    spare = make_version(models, seed=1).version
    base = make_version(models, seed=2).version
    make_job(state.jobs, home, "interrupted", base=base)  # resumable: needs its base

    r = served.delete(f"/admin/models/{served_v}", headers=AUTH)
    assert "ACTIVE" in assert_error(r, 409, "conflict")["message"]  # type: ignore[operator]
    # ACTIVE moved on disk, but this server still serves the old one: still refused
    write_active(models, spare)
    r = served.delete(f"/admin/models/{served_v}", headers=AUTH)
    assert "serving" in assert_error(r, 409, "conflict")["message"]  # type: ignore[operator]
    write_active(models, served_v)
    r = served.delete(f"/admin/models/{base}", headers=AUTH)
    assert "fine-tunes from it" in assert_error(r, 409, "conflict")["message"]  # type: ignore[operator]

    size = tree_bytes(models / spare)
    r = served.delete(f"/admin/models/{spare}", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": spare, "freed_bytes": size}
    assert not (models / spare).exists() and not list(models.glob(".tmp-*"))
    listed = {v["version"] for v in served.get("/v1/models").json()["versions"]}
    assert listed == {served_v, base}
    assert_error(served.delete(f"/admin/models/{spare}", headers=AUTH), 404, "not_found")
    assert_error(served.delete("/admin/models/..", headers=AUTH), 404, "not_found")
    assert_error(served.delete(f"/admin/models/{spare}"), 401, "unauthorized")
    # and the served version still answers
    assert served.get("/readyz").status_code == 200


def test_purge_a_finished_jobs_state(served: TestClient, home: Path) -> None:
    state = state_of(served)
    assert state.jobs is not None
    done = make_job(state.jobs, home, "succeeded")
    run = home / "jobs" / done.id
    r = served.delete(f"/admin/jobs/{done.id}", params={"purge": "true"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["state_purged"] is True, r.text
    assert sorted(p.name for p in run.iterdir()) == ["train.log"]  # the record's files stay
    # without purge a finished job still cannot be "cancelled"
    assert_error(served.delete(f"/admin/jobs/{done.id}", headers=AUTH), 409, "conflict")

    running = make_job(state.jobs, home, "running")
    r = served.delete(f"/admin/jobs/{running.id}", params={"purge": "true"}, headers=AUTH)
    assert "cancel it first" in assert_error(r, 409, "conflict")["message"]  # type: ignore[operator]
    assert (home / "jobs" / running.id / "state.safetensors").is_file()

    stopped = make_job(state.jobs, home, "cancelled")
    served.delete(f"/admin/jobs/{stopped.id}", params={"purge": "true"}, headers=AUTH)
    r = served.post(f"/admin/jobs/{stopped.id}/resume", headers=AUTH)
    assert "was deleted" in assert_error(r, 409, "conflict")["message"]  # type: ignore[operator]


def test_retention_keeps_what_can_resume(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "alexnet.db")
    old_failed = make_job(jobs, tmp_path, "failed")
    interrupted = make_job(jobs, tmp_path, "interrupted")
    cancelled = make_job(jobs, tmp_path, "cancelled")
    succeeded = make_job(jobs, tmp_path, "succeeded")
    new_failed = make_job(jobs, tmp_path, "failed")

    def has_state(job: Job) -> bool:
        return (tmp_path / "jobs" / job.id / "state.safetensors").is_file()

    assert retain_job_state(jobs=jobs, jobs_dir=tmp_path / "jobs", keep_failed=-1) == 0
    assert all(map(has_state, (old_failed, interrupted, cancelled, succeeded, new_failed)))
    freed = retain_job_state(jobs=jobs, jobs_dir=tmp_path / "jobs", keep_failed=1)
    assert freed == 2 * (STATE_BYTES + 1000)
    assert not has_state(succeeded) and not has_state(old_failed)  # can never continue
    assert has_state(new_failed)  # the newest failed one, kept for a resume by hand
    assert has_state(interrupted) and has_state(cancelled)  # resumable: never touched
    assert jobs.get(succeeded.id).purged_at is not None  # type: ignore[union-attr]
    assert jobs.get(interrupted.id).purged_at is None  # type: ignore[union-attr]
    jobs.close()


def test_a_database_from_before_purging_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    from app.jobs.store import _SCHEMA

    old_schema = _SCHEMA.replace("resume INTEGER NOT NULL DEFAULT 0,\n    purged_at REAL",
                                 "resume INTEGER NOT NULL DEFAULT 0")  # fmt: skip
    assert "purged_at" not in old_schema
    db = sqlite3.connect(tmp_path / "alexnet.db")
    db.executescript(old_schema)
    db.execute("INSERT INTO jobs (id, seq, status, config, activate, created_at) "
               "VALUES ('aaaaaaaaaaaa', 1, 'failed', '{}', 'never', 0)")  # fmt: skip
    db.commit()
    db.close()
    jobs = JobStore(tmp_path / "alexnet.db")
    [job] = jobs.list()
    assert job.id == "aaaaaaaaaaaa" and job.purged_at is None
    assert jobs.update(job.id, purged_at=1.0) and jobs.get(job.id).purged_at == 1.0  # type: ignore[union-attr]
    jobs.close()
