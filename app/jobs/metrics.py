"""Job progress as Prometheus gauges, read from the job store at scrape time (one small
SQLite query per scrape, nothing on a request's path)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import get_args

from prometheus_client.core import GaugeMetricFamily

from app.jobs.store import JobStore, Status

log = logging.getLogger(__name__)


class JobsCollector:
    """`alexnet_jobs{status}`, and the running job's epoch, step, progress, speed and ETA
    (absent while none runs). No job-id labels: one running job at a time."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.store.status_counts()
            running = self.store.list(status="running", limit=1)
        except Exception:  # a locked or vanished database must not fail the scrape
            log.warning("job metrics unavailable", exc_info=True)
            return
        jobs = GaugeMetricFamily("alexnet_jobs", "Training jobs by status", labels=["status"])
        for status in get_args(Status):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        if not running:
            return
        job = running[0]
        done = 0.0
        if job.epochs:
            within = job.step / job.steps if job.steps else 0.0
            done = min(1.0, (max(job.epoch - 1, 0) + within) / job.epochs)
        gauges = [
            ("alexnet_job_progress_ratio", "The running job's share done (epochs and steps)", done),
            ("alexnet_job_epoch", "The running job's epoch (1-based)", job.epoch),
            ("alexnet_job_epochs", "The running job's epochs", job.epochs),
            ("alexnet_job_step", "The running job's step in its epoch", job.step),
            ("alexnet_job_steps", "The running job's steps per epoch", job.steps),
        ]
        if job.images_per_s is not None:
            gauges.append(("alexnet_job_images_per_second", "The running job's training "
                           "throughput", job.images_per_s))  # fmt: skip
        if job.eta_s is not None:
            gauges.append(("alexnet_job_eta_seconds", "The running job's estimated time left",
                           job.eta_s))  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
