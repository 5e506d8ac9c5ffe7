"""A job's progress: the trainer's events (model/run.py) read from its events file as they
are appended, applied to the job's record, and told in the service log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.jobs.store import Job
from model.run import (
    EpochEnd,
    EpochStart,
    Event,
    Failed,
    Finished,
    Start,
    Step,
    Tracking,
    parse_event,
)

log = logging.getLogger("app.jobs")  # (the name job lines have always had)


def apply_event(job: Job, ev: Event) -> dict[str, Any]:
    """The record fields that trainer event `ev` changes (also applied to `job`)."""
    ch: dict[str, Any] = {}
    if isinstance(ev, Start):
        # (a new attempt: what an earlier one's rank said on its way out is behind it)
        ch = {"epochs": ev.epochs, "steps": ev.steps_per_epoch, "error": None}
        if ev.history:  # a resumed run: its finished epochs as its state has them
            told = {h.get("epoch"): h for h in job.history}
            ch["history"] = [told.get(h.epoch) or h.model_dump() for h in ev.history]
    elif isinstance(ev, EpochStart):
        ch = {"epoch": ev.epoch, "epochs": ev.epochs, "step": 0}
    elif isinstance(ev, Step):
        ch = {"epoch": ev.epoch, "step": ev.step, "steps": ev.steps,
              "images_per_s": ev.images_per_s, "eta_s": ev.eta_s}  # fmt: skip
    elif isinstance(ev, EpochEnd):
        record = ev.record()
        history = [h for h in job.history if h.get("epoch") != ev.epoch] + [record]
        ch = {"history": sorted(history, key=lambda h: h["epoch"]), "epoch": ev.epoch}
    elif isinstance(ev, Finished):
        ch = {"result_version": ev.version, "metrics": ev.metrics, "eta_s": 0.0}
    elif isinstance(ev, Failed):
        ch = {"error": ev.error}
    elif isinstance(ev, Tracking):
        news = {"status": ev.status, **ev.detail, "error": ev.error}
        ch = {"tracking": {**(job.tracking or {}), ev.backend: news}}
    for k, v in ch.items():
        setattr(job, k, v)
    return ch


class EventTail:
    """Reads complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset = path, offset

    def read(self) -> list[Event]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [ev for ev in map(parse_event, data[:end].splitlines()) if ev is not None]


def log_event(job: Job, ev: Event) -> None:
    """A job's progress in the service log, in words: where it runs and each epoch."""
    if isinstance(ev, Start):
        d = ev.device
        log.info("job %s: training %s on %s (%s train / %s val images) on %s %s%s",
                 job.id, ev.config.get("arch"), ev.config.get("dataset"),
                 ev.split.get("train"), ev.split.get("val"), d.get("device"),
                 d.get("precision"),
                 f", resumed at epoch {ev.resumed_from[0]}" if ev.resumed_from else "")  # fmt: skip
    elif isinstance(ev, Tracking) and ev.status == "failed":
        log.warning("job %s: %s tracking failed, training goes on without it: %s",
                    job.id, ev.backend, ev.error)  # fmt: skip
    elif isinstance(ev, EpochEnd):
        eta = f", about {job.eta_s:.0f} s left" if job.eta_s and ev.epoch < ev.epochs else ""
        log.info("job %s: epoch %d/%d val_loss %.4f val_top1 %.1f%% (%.0f img/s)%s",
                 job.id, ev.epoch, ev.epochs, ev.val_loss, 100 * ev.val_top1,
                 ev.images_per_s, eta)  # fmt: skip
