"""A run in the tools its users already have: MLflow and TensorBoard.

Trackers follow the trainer's events (model/run.py) on rank 0 and, as `TrainHooks`, see
each optimizer step and a few validation images. They never fail or stall training:

- MLflow's client talks HTTP from a thread of its own, fed by a queue. The first error is
  logged once, what is left is dropped, and a `Tracking` event (status "failed") tells the
  job record. At the end of a run the trainer waits for the queue at most `timeout_s`.
- TensorBoard's writer appends to event files in the run folder; an error (a full disk)
  turns it off the same way.

A resumed run continues the same MLflow run (its id is kept in the run folder's
mlflow.json) and TensorBoard drops the steps the resumed run repeats (`purge_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import torch

from model.files import atomic_write_bytes
from model.run import (
    PLOT_FILE,
    EpochEnd,
    Event,
    Failed,
    Finished,
    Interrupted,
    Start,
    Tracking,
)

log = logging.getLogger(__name__)

MLFLOW_RUN_FILE: Final = "mlflow.json"
SAMPLE_IMAGES: Final = 8
# MLflow's own defaults wait 120 s a request and retry 7 times with backoff: minutes per
# call against a dead server. Ours, unless the user set them.
# MLflow 3 also sends usage telemetry to its makers unless told not to: off.
_MLFLOW_ENV: Final = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip


class TrainHooks:
    """What the trainer calls on rank 0 besides its events (every method a no-op here)."""

    wants_samples = False  # whether `samples` should be called after each validation

    def step(self, global_step: int, loss: float, lr: float) -> None:
        """After each optimizer step; `global_step` counts from 1 across epochs."""

    def samples(self, epoch: int, images: torch.Tensor, truth: Sequence[str],
                predicted: Sequence[str], confidence: Sequence[float]) -> None:  # fmt: skip
        """A few validation images (uint8, N x 3 x H x W) with what the model said."""


class Tracker(TrainHooks):
    """A destination for a run's record. `handle` takes each trainer event and returns the
    `Tracking` events to emit before it (how a job record learns of the tracker)."""

    backend: str = ""

    def handle(self, ev: Event) -> list[Event]:
        raise NotImplementedError


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _numbers(d: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in (d or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


def machine() -> dict[str, str]:
    from model.device import cpu_info

    cpu, flags = cpu_info()
    amx = "amx_bf16" in flags
    return {"host": platform.node(), "cpu": cpu, "amx": str(amx),
            "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


# ----------------------------------------------------------------------------- MLflow


# How long a stopped or failed run waits for MLflow to take what is queued (a finished
# one waits up to the timeout: its artifacts are worth it).
STOP_WAIT_S: Final = 5.0


class MLflowTracker(Tracker):
    """Each run an MLflow run: params, per-epoch metrics, artifacts and tags (see module)."""

    backend = "mlflow"

    def __init__(self, uri: str, *, run_dir: Path, models_dir: Path,
                 experiment: str | None = None, job_id: str | None = None,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        self.uri, self.run_dir, self.models_dir = uri, run_dir, models_dir
        self.experiment, self.job_id, self.timeout_s = experiment, job_id, timeout_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.error: str | None = None
        self._reported: str | None = None  # the status last told
        self._started = False  # a Start was handled (so there is a run to end)
        self._q: queue.Queue[Callable[[Any], None] | None] = queue.Queue()
        self._done = threading.Event()
        for k, v in _MLFLOW_ENV.items():  # (before the client is imported, in the thread)
            os.environ.setdefault(k, v)
        self._thread = threading.Thread(target=self._work, name="mlflow", daemon=True)
        self._thread.start()

    # The worker thread: every call to the server happens here.
    def _work(self) -> None:
        client: Any = None
        while True:
            job = self._q.get()
            if job is None:
                self._done.set()
                return
            if self.error is not None:
                continue
            try:
                if client is None:
                    try:
                        from mlflow.tracking import MlflowClient
                    except ImportError as exc:
                        raise RuntimeError(
                            "the MLflow client is not installed: pip install "
                            "'alexnet-service[mlflow]'"
                        ) from exc
                    client = MlflowClient(tracking_uri=self.uri)
                job(client)
            except Exception as exc:  # the run goes on without it
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                log.warning("MLflow tracking at %s failed, training goes on without it: %s",
                            self.uri, self.error)  # fmt: skip

    def _send(self, job: Callable[[Any], None]) -> None:
        if self.error is None and not self._done.is_set():
            self._q.put(job)

    def _status(self) -> list[Event]:
        """A Tracking event when there is news: the run created, or tracking failed."""
        if self.error is not None and self._reported != "failed":
            self._reported = "failed"
            return [Tracking(backend="mlflow", status="failed", error=self.error,
                             detail=self._detail())]  # fmt: skip
        if self.run_id is not None and self._reported is None:
            self._reported = "ok"
            return [Tracking(backend="mlflow", status="ok", detail=self._detail())]
        return []

    def _detail(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def handle(self, ev: Event) -> list[Event]:
        if isinstance(ev, Start):
            self._started = True
            self._send(lambda c: self._start(c, ev))
        elif isinstance(ev, EpochEnd):
            self._send(lambda c: self._epoch(c, ev))
        elif isinstance(ev, Finished):
            self._send(lambda c: self._finished(c, ev))
        elif isinstance(ev, Failed | Interrupted):
            status = "FAILED" if isinstance(ev, Failed) else "KILLED"
            if self._started:  # (a run that failed before its start has nothing to end)
                self._send(lambda c: self._terminated(c, status))
        if isinstance(ev, Finished):
            self._finish(self.timeout_s)
        elif isinstance(ev, Failed | Interrupted) and self._started:
            self._finish(min(self.timeout_s, STOP_WAIT_S))  # a stop is prompt; best effort
        return self._status()

    def _terminated(self, c: Any, status: str) -> None:
        if self.run_id is not None:  # (a run stopped before its MLflow run was made: none)
            c.set_terminated(self.run_id, status)

    def _finish(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) for the server to take what is queued."""
        self._q.put(None)
        if not self._done.wait(timeout_s) and self.error is None:
            self.error = (f"the tracking server took more than {timeout_s:g} s; "
                          "what was left was not sent")  # fmt: skip
            log.warning("MLflow tracking at %s: %s", self.uri, self.error)

    def _start(self, c: Any, ev: Start) -> None:
        from mlflow.entities import Param, RunTag

        saved = self._saved_run()
        if saved is not None and self._still_there(c, saved["run_id"]):
            # a resumed run goes on in the same MLflow run
            self.run_id, self.experiment_id = saved["run_id"], saved["experiment_id"]
            c.update_run(self.run_id, status="RUNNING")
            return
        name = self.experiment or str(ev.config.get("dataset") or "alexnet")
        exp = c.get_experiment_by_name(name)
        if exp is None:
            try:
                self.experiment_id = c.create_experiment(name)
            except Exception:  # created meanwhile by another run
                exp = c.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp is not None:
            self.experiment_id = exp.experiment_id
        tags = {"alexnet.run_dir": str(self.run_dir), "alexnet.arch": str(ev.config.get("arch"))}
        if self.job_id:
            tags["alexnet.job_id"] = self.job_id
        run = c.create_run(self.experiment_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        atomic_write_bytes(self.run_dir / MLFLOW_RUN_FILE, json.dumps(
            {"run_id": self.run_id, "experiment_id": self.experiment_id, "uri": self.uri}
        ).encode())  # fmt: skip
        params = {**_flat("", ev.config), "dataset_hash": ev.dataset_hash,
                  "base_version": (ev.base or {}).get("version") or ev.config.get("base"),
                  "classes": len(ev.labels), "world": ev.world,
                  **_flat("split.", ev.split), **_flat("device.", ev.device),
                  **_flat("machine.", machine())}  # fmt: skip
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            c.log_batch(self.run_id, params=items[i : i + 100], tags=[])
        c.log_batch(self.run_id, tags=[RunTag("alexnet.world", str(ev.world))])

    @staticmethod
    def _still_there(c: Any, run_id: str) -> bool:
        """Whether the MLflow run a resumed run started is still there (not deleted in the
        UI, or purged); when it is not, the run goes on in a new one."""
        from mlflow.exceptions import MlflowException

        try:
            run = c.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s is gone: this resumed run goes on in a new one", run_id)
            return False
        return True

    def _saved_run(self) -> dict[str, Any] | None:
        try:
            saved: dict[str, Any] = json.loads((self.run_dir / MLFLOW_RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        return saved if saved.get("uri") == self.uri and saved.get("run_id") else None

    def _epoch(self, c: Any, ev: EpochEnd) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: getattr(ev, k) for k in ("train_loss", "val_loss", "val_top1", "val_top5",
                                              "lr", "grad_norm", "images_per_s", "epoch_time_s")}  # fmt: skip
        c.log_batch(self.run_id, metrics=[Metric(k, float(v), now, ev.epoch)
                                          for k, v in values.items()])  # fmt: skip

    def _finished(self, c: Any, ev: Finished) -> None:
        from mlflow.entities import Metric, RunTag

        from model.checkpoint import CARD_FILE, RELIABILITY_FILE, read_card

        version_dir = self.models_dir / ev.version
        card = read_card(version_dir)
        step = int(ev.metrics.get("epochs_run", 0) or 0)
        now = int(time.time() * 1000)
        figures = {**_numbers(ev.metrics, "best_"), **_numbers(card.calibration, "calibration_")}
        c.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()],
                    tags=[RunTag("alexnet.version", card.version),
                          RunTag("alexnet.sha256", card.sha256)])  # fmt: skip
        for path in (self.run_dir / PLOT_FILE, version_dir / CARD_FILE,
                     version_dir / RELIABILITY_FILE):  # fmt: skip
            if path.is_file():
                c.log_artifact(self.run_id, str(path))
        c.set_terminated(self.run_id, "FINISHED")


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker(Tracker):
    """Event files in the run folder: `tensorboard --logdir $ALEXNET_HOME/runs` shows each
    run under its folder's name. Scalars per step (train/loss, train/lr) and per epoch
    (epoch/...), and after each validation a few images with the model's answers."""

    backend = "tensorboard"
    wants_samples = True

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer: Any = None
        self.error: str | None = None
        self._reported: str | None = None  # the status last told

    def _guard(self, fn: Callable[[], object]) -> None:
        if self.error is not None:
            return
        try:
            fn()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.warning("TensorBoard logging failed, training goes on without it: %s",
                        self.error)  # fmt: skip
            with contextlib.suppress(Exception):
                if self.writer is not None:
                    self.writer.close()
            self.writer = None

    def _open(self, ev: Start) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "TensorBoard is not installed: pip install 'alexnet-service[tensorboard]'"
            ) from exc
        purge = None
        if ev.resumed_from is not None:  # what the resumed run repeats is dropped
            epoch, step = ev.resumed_from
            purge = (epoch - 1) * ev.steps_per_epoch + step + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        if purge is None:
            rows = "\n".join(f"| {k} | {v} |" for k, v in ev.config.items())
            self.writer.add_text("config", f"| option | value |\n|---|---|\n{rows}", 0)

    def handle(self, ev: Event) -> list[Event]:
        if isinstance(ev, Start):
            self._guard(lambda: self._open(ev))
        elif isinstance(ev, EpochEnd) and self.writer is not None:
            w = self.writer
            self._guard(lambda: [w.add_scalar(f"epoch/{k}", float(getattr(ev, k)), ev.epoch)
                                 for k in ("train_loss", "val_loss", "val_top1", "val_top5",
                                           "lr", "images_per_s")])  # fmt: skip
            self._guard(w.flush)
        elif isinstance(ev, Finished | Failed | Interrupted) and self.writer is not None:
            self._guard(self.writer.close)
        if self.error is not None and self._reported != "failed":
            self._reported = "failed"
            return [Tracking(backend="tensorboard", status="failed", error=self.error,
                             detail={"logdir": str(self.run_dir)})]  # fmt: skip
        if isinstance(ev, Start) and self._reported is None:
            self._reported = "ok"
            return [Tracking(backend="tensorboard", status="ok",
                             detail={"logdir": str(self.run_dir)})]  # fmt: skip
        return []

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            w = self.writer
            self._guard(lambda: (w.add_scalar("train/loss", loss, global_step),
                                 w.add_scalar("train/lr", lr, global_step)))  # fmt: skip

    def samples(self, epoch: int, images: torch.Tensor, truth: Sequence[str],
                predicted: Sequence[str], confidence: Sequence[float]) -> None:  # fmt: skip
        if self.writer is None:
            return
        rows = "\n".join(f"| {i} | {t} | {p} | {c:.1%} | {'yes' if t == p else 'no'} |"
                         for i, (t, p, c) in enumerate(zip(truth, predicted, confidence,
                                                           strict=True)))  # fmt: skip
        table = f"| image | label | answer | confidence | right |\n|---|---|---|---|---|\n{rows}"
        w = self.writer
        self._guard(lambda: (w.add_images("val/images", images, epoch, dataformats="NCHW"),
                             w.add_text("val/answers", table, epoch)))  # fmt: skip


def trackers(*, run_dir: Path, models_dir: Path, mlflow_uri: str | None,
             mlflow_experiment: str | None, tensorboard: bool, job_id: str | None,
             mlflow_timeout_s: float = 30.0) -> list[Tracker]:  # fmt: skip
    """The trackers a run's options ask for (rank 0 only: the caller's business)."""
    out: list[Tracker] = []
    if mlflow_uri:
        out.append(MLflowTracker(mlflow_uri, run_dir=run_dir, models_dir=models_dir,
                                 experiment=mlflow_experiment, job_id=job_id,
                                 timeout_s=mlflow_timeout_s))  # fmt: skip
    if tensorboard:
        out.append(TensorBoardTracker(run_dir))
    return out
