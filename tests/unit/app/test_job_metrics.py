"""Job progress gauges, read from a real SQLite job store at scrape time."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from app.jobs.metrics import JobsCollector
from app.jobs.store import JobStore
from app.schemas import JobRequest


def _scrape(store: JobStore) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(JobsCollector(store))
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_job_counts_and_the_running_jobs_progress(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "alexnet.db")
    assert _scrape(store)['alexnet_jobs{status="running"}'] == 0
    assert "alexnet_job_progress_ratio" not in _scrape(store)  # nothing runs: no progress
    a = store.create(JobRequest(dataset="synthetic", image_size=64))
    store.create(JobRequest(dataset="synthetic", image_size=64))
    store.update(a.id, status="running", epoch=2, epochs=4, step=5, steps=10,
                 images_per_s=123.5, eta_s=42.0)  # fmt: skip
    m = _scrape(store)
    assert m['alexnet_jobs{status="running"}'] == 1
    assert m['alexnet_jobs{status="queued"}'] == 1
    assert m['alexnet_jobs{status="failed"}'] == 0
    assert m["alexnet_job_progress_ratio"] == (1 + 5 / 10) / 4
    assert m["alexnet_job_epoch"] == 2 and m["alexnet_job_epochs"] == 4
    assert m["alexnet_job_images_per_second"] == 123.5 and m["alexnet_job_eta_seconds"] == 42.0
    store.update(a.id, status="succeeded")
    m = _scrape(store)
    assert m['alexnet_jobs{status="succeeded"}'] == 1 and "alexnet_job_epoch" not in m


def test_a_broken_store_does_not_fail_the_scrape(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "alexnet.db")
    store.close()
    assert _scrape(store) == {}
