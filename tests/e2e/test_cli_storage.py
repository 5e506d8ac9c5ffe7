"""`alexnet models delete` and `alexnet gc` as real subprocesses on a real home: they free
what nothing needs and never what the service or a resumable job still needs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.jobs.store import JobStore
from app.presence import announce, update, withdraw
from app.schemas import JobRequest
from tests.helpers.cli import run_cli
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e


def run_state(folder: Path, *, finished: str | None) -> None:
    """A run folder with a resumable state, as the trainer writes it."""
    folder.mkdir(parents=True)
    meta = {"state": json.dumps({"finished_version": finished, "epoch": 1, "step": 0})}
    save_file({"model.w": torch.zeros(256, 256)}, str(folder / "state.safetensors"), meta)


def test_models_delete_never_removes_a_version_in_use(home: Path) -> None:
    models = home / "models"
    active = make_version(models, activate=True).version
    other = make_version(models, seed=1).version
    elsewhere = make_version(models, seed=2).version

    r = run_cli("models", "delete", active, home=home)
    assert r.returncode == 1 and "it is the ACTIVE version" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a server (this test process stands in for one) serving a version that is not ACTIVE
    record = announce(home, watch_active_s=0)
    update(record, serving=elsewhere)
    try:
        r = run_cli("models", "delete", elsewhere, home=home)
        assert r.returncode == 1 and "a server is serving it" in r.stderr, r.stderr
    finally:
        withdraw(record)

    r = run_cli("models", "delete", other, "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["deleted"] == other and out["freed_bytes"] > 200_000_000
    assert not (models / other).exists() and not list(models.glob(".tmp-*"))
    listed = run_cli("models", "list", "--json", home=home)
    sizes = {v["version"]: v["size_bytes"] for v in json.loads(listed.stdout)["versions"]}
    assert set(sizes) == {active, elsewhere} and all(n > 200_000_000 for n in sizes.values())
    r = run_cli("models", "delete", other, home=home)
    assert r.returncode == 1 and "no model version" in r.stderr, r.stderr


def test_gc_frees_what_nothing_needs(home: Path) -> None:
    models = home / "models"
    active = make_version(models, activate=True).version
    base = make_version(models, seed=1).version
    old = make_version(models, seed=2).version
    jobs = JobStore(home / "alexnet.db")
    ids: dict[str, str] = {}
    for status in ("succeeded", "failed", "interrupted"):
        job = jobs.create(JobRequest(dataset="synthetic", base=base if status == "interrupted"
                                     else None))  # fmt: skip
        jobs.update(job.id, status=status)
        run_state(home / "jobs" / job.id, finished="v" if status == "succeeded" else None)
        ids[status] = job.id
    jobs.close()
    run_state(home / "runs" / "finished-run", finished="v")
    run_state(home / "runs" / "unfinished-run", finished=None)
    partial = models / ".tmp-crashed.p1.abcd"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"\0" * 1000)
    stale = time.time() - 3600
    os.utime(partial, (stale, stale))

    r = run_cli("gc", "--dry-run", "--json", home=home)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    found = {(i["kind"], i["name"]) for i in report["items"]}
    assert found == {("job_state", ids["succeeded"]), ("run_state", "finished-run"),
                     ("partial_save", partial.name)}, found  # fmt: skip
    assert report["freed_bytes"] == 0 and partial.exists()  # a dry run deletes nothing

    r = run_cli("gc", home=home)
    assert r.returncode == 0 and "freed" in r.stdout, r.stderr
    assert not (home / "jobs" / ids["succeeded"] / "state.safetensors").exists()
    assert not (home / "runs" / "finished-run" / "state.safetensors").exists()
    assert not partial.exists()
    # kept: the newest failed job (ALEXNET_KEEP_JOB_STATE=1), a resumable job, an
    # unfinished run that `alexnet train --resume` can continue
    for kept in (home / "jobs" / ids["failed"], home / "jobs" / ids["interrupted"],
                 home / "runs" / "unfinished-run"):  # fmt: skip
        assert (kept / "state.safetensors").is_file(), kept
    assert json.loads(run_cli("gc", "--json", home=home).stdout)["items"] == []

    # Versions only when asked: the active one and a resumable job's base stay.
    r = run_cli("gc", "--keep-versions", "0", "--json", home=home)
    assert [i["name"] for i in json.loads(r.stdout)["items"]] == [old]
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == sorted([active, base])
