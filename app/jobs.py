"""Admin training jobs: records in SQLite, one child process at a time.

A job is `alexnet train` run as a child process (torchrun when `nproc_per_node` > 1) in its
own process group, niced, with capped threads, writing into `$ALEXNET_HOME/jobs/<id>/`:
`events.jsonl` (the trainer's progress events, which the runner tails into the record),
`train.log` (its stdout and stderr), the resumable state and `losses.png`.

Statuses: queued -> running -> succeeded | failed | cancelled | interrupted.
`interrupted` means the service stopped (or the child was stopped by someone else) while the
job ran; its last epoch state is on disk and POST /admin/jobs/{id}/resume continues it. The
runner never resumes on its own, except the bootstrap job (the service needs its model).
A child outlives a killed server only briefly: it asks the kernel for SIGTERM when its parent
dies, saves its state and exits, and the next start marks the job interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field

from model.checkpoint import remove_partial_saves
from model.config import TrainConfig

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
RESUMABLE: Final = frozenset({"interrupted", "cancelled"})
Activate = Literal["if_better", "always", "never"]

EVENTS_FILE: Final = "events.jsonl"
LOG_FILE: Final = "train.log"
PLOT_FILE: Final = "losses.png"
EXIT_INTERRUPTED: Final = 75
POLL_S: Final = 0.25
KILL_AFTER_S: Final = 120.0  # a cancelled child that has not saved by then is killed


class JobRequest(TrainConfig):
    """POST /admin/jobs: the `alexnet train` options in snake_case, plus what to do with
    the result."""

    activate: Activate = Field(
        "if_better",
        description="if_better: activate when val top-1 beats the active version on the same "
        "labels (or nothing is active); always; never",
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="processes (GPUs); torchrun if > 1")

    model_config = {"json_schema_extra": {"examples": [{
        "dataset": "synthetic", "image_size": 64, "batch_size": 32, "epochs": 10,
        "dropout": 0.0, "activate": "if_better"}]}}  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(exclude={"activate", "nproc_per_node"}))


@dataclass
class Job:
    id: str
    status: Status
    config: dict[str, Any]
    activate: Activate
    nproc_per_node: int = 1
    source: str = "api"  # api | bootstrap
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    images_per_s: float | None = None
    eta_s: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    result_version: str | None = None
    metrics: dict[str, Any] | None = None
    activated: bool = False
    activation: str | None = None  # why it was or was not activated
    error: str | None = None
    pid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    resume: bool = False  # the next run continues the saved state
    purged_at: float | None = None  # when its resumable state was deleted

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "source": self.source,
            "config": self.config,
            "activate": self.activate,
            "nproc_per_node": self.nproc_per_node,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": {
                "epoch": self.epoch,
                "epochs": self.epochs or self.config.get("epochs", 0),
                "step": self.step,
                "steps": self.steps,
                "images_per_s": self.images_per_s,
                "eta_s": self.eta_s,
            },
            "history": self.history,
            "result_version": self.result_version,
            "metrics": self.metrics,
            "activated": self.activated,
            "activation": self.activation,
            "error": self.error,
            "attempts": self.attempts,
            "state_purged": self.purged_at is not None,
        }


_JSON_COLUMNS: Final = ("config", "history", "metrics")
_BOOL_COLUMNS: Final = ("activated", "cancel_requested", "resume")
_COLUMNS: Final = frozenset(Job.__dataclass_fields__) - {"id"}
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    activate TEXT NOT NULL,
    nproc_per_node INTEGER NOT NULL DEFAULT 1,
    source TEXT NOT NULL DEFAULT 'api',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    epoch INTEGER NOT NULL DEFAULT 0,
    epochs INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    images_per_s REAL,
    eta_s REAL,
    history TEXT NOT NULL DEFAULT '[]',
    result_version TEXT,
    metrics TEXT,
    activated INTEGER NOT NULL DEFAULT 0,
    activation TEXT,
    error TEXT,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class JobStore:
    """Job records in SQLite (WAL; every change is one committed transaction)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
        with self._tx() as db:
            db.executescript(_SCHEMA)
            # Databases made before a column existed get it (each ALTER is one statement).
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "purged_at" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN purged_at REAL")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(row: sqlite3.Row) -> Job:
        d = dict(row)
        d.pop("seq")
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        for k in _BOOL_COLUMNS:
            d[k] = bool(d[k])
        return Job(**d)

    def create(self, req: JobRequest, *, source: str = "api") -> Job:
        job = Job(
            id=uuid.uuid4().hex[:12],
            status="queued",
            config=req.train_config().model_dump(mode="json"),
            activate=req.activate,
            nproc_per_node=req.nproc_per_node,
            source=source,
            created_at=time.time(),
        )
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, status, config, activate, nproc_per_node, source,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, seq, job.status, json.dumps(job.config), job.activate,
                 job.nproc_per_node, job.source, job.created_at),
            )  # fmt: skip
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, *, status: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        with self._tx() as db:
            if status:
                rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?",
                                  (status, limit)).fetchall()  # fmt: skip
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?",
                                  (limit,)).fetchall()  # fmt: skip
        return [self._row(r) for r in rows]

    def next_queued(self) -> Job | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
        return self._row(row) if row else None

    def count(self, status: str) -> int:
        with self._tx() as db:
            n: int = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?",
                                (status,)).fetchone()[0]  # fmt: skip
        return n

    def update(self, job_id: str, *, expect: tuple[str, ...] | None = None,
               **fields: Any) -> bool:  # fmt: skip
        """Set `fields`; with `expect`, only while the status is one of those (returns
        whether a row changed: a compare-and-set against concurrent cancels)."""
        values = [
            json.dumps(v) if k in _JSON_COLUMNS and v is not None
            else int(v) if k in _BOOL_COLUMNS else v
            for k, v in fields.items()
        ]  # fmt: skip
        unknown = set(fields) - _COLUMNS
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        # Column names come from the fixed set above; values are bound parameters.
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"  # noqa: S608
        params: list[Any] = [*values, job_id]
        if expect:
            sql += f" AND status IN ({', '.join('?' * len(expect))})"
            params += list(expect)
        with self._tx() as db:
            return db.execute(sql, params).rowcount > 0


# ----------------------------------------------------------------------------- events


def apply_event(job: Job, ev: dict[str, Any]) -> dict[str, Any]:
    """The record fields that trainer event `ev` changes (also applied to `job`)."""
    kind = ev.get("type")
    ch: dict[str, Any] = {}
    if kind == "start":
        ch = {"epochs": int(ev["epochs"]), "steps": int(ev["steps_per_epoch"])}
    elif kind == "epoch_start":
        ch = {"epoch": int(ev["epoch"]), "epochs": int(ev["epochs"]), "step": 0}
    elif kind == "step":
        ch = {"epoch": int(ev["epoch"]), "step": int(ev["step"]), "steps": int(ev["steps"]),
              "images_per_s": float(ev["images_per_s"]), "eta_s": float(ev["eta_s"])}  # fmt: skip
    elif kind == "epoch_end":
        keys = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "grad_norm",
                "images_per_s", "epoch_time_s", "improved")  # fmt: skip
        record = {k: ev[k] for k in keys if k in ev}
        history = [h for h in job.history if h.get("epoch") != record["epoch"]] + [record]
        ch = {"history": sorted(history, key=lambda h: h["epoch"]), "epoch": int(ev["epoch"])}
    elif kind == "finished":
        ch = {"result_version": ev["version"], "metrics": ev.get("metrics"), "eta_s": 0.0}
    elif kind == "failed":
        ch = {"error": str(ev.get("error", "training failed"))}
    for k, v in ch.items():
        setattr(job, k, v)
    return ch


class EventTail:
    """Reads complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset = path, offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


# ----------------------------------------------------------------------------- the runner


def writer_tag(job_id: str) -> str:
    return f"job-{job_id}"


def train_argv(job: Job, run_dir: Path) -> list[str]:
    """The `alexnet train` command line for `job` (resuming its run folder if asked)."""
    if job.resume:
        args = ["--resume", str(run_dir)]
    else:
        args = []
        for name, value in job.config.items():
            if value is None:
                continue
            opt = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                args.append(opt if value else "--no-" + name.replace("_", "-"))
            else:
                args += [opt, str(value)]
    if job.nproc_per_node > 1:
        args += ["--nproc-per-node", str(job.nproc_per_node)]
    return [sys.executable, "-m", "app.cli", "train", *args, "--run-dir", str(run_dir),
            "--events-file", str(run_dir / EVENTS_FILE), "--keep-active"]  # fmt: skip


OnSuccess = Callable[[Job], Awaitable[None]]


class JobRunner:
    """Runs queued jobs one at a time as child processes; an asyncio task of the service."""

    def __init__(self, store: JobStore, jobs_dir: Path, home: Path, *, threads: int,
                 nice: int, on_success: OnSuccess | None = None,
                 stop_timeout_s: float = 8.0, keep_job_state: int = -1) -> None:  # fmt: skip
        self.store, self.jobs_dir, self.home = store, jobs_dir, home
        self.keep_job_state = keep_job_state
        self.threads, self.nice = threads, nice
        self.on_success = on_success
        self.stop_timeout_s = stop_timeout_s
        self._wake = asyncio.Event()
        self._stopping = False
        self.current: Job | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def run_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.recover()
        self.retain()
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Service shutdown: the running child saves its state; the job is `interrupted`."""
        self._stopping = True
        proc, job = self._proc, self.current
        if proc is not None and job is not None and proc.returncode is None:
            log.info("stopping job %s: it saves its state and resumes on request", job.id)
            _signal_leader(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            self._finish_interrupted(job, "the service stopped while this job ran")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def recover(self) -> None:
        """At startup: jobs recorded as running belong to a previous process of the service.
        Stop any child still alive, read the events it left, mark the job."""
        for job in self.store.list(status="running", limit=1000):
            if job.pid and _is_our_child(job.pid, self.run_dir(job.id)):
                log.warning("job %s: stopping the child %d left by a previous run", job.id,
                            job.pid)  # fmt: skip
                _signal_group(job.pid, signal.SIGTERM)
                _wait_gone(job.pid, self.stop_timeout_s)
            self.cleanup(job)
            self._catch_up(job)
            if job.result_version:
                self.store.update(
                    job.id,
                    status="succeeded",
                    finished_at=time.time(),
                    pid=None,
                    activation="finished while the service was down; "
                    "activate it through POST /admin/models/{version}/activate",
                )
            else:
                self._finish_interrupted(job, "the service stopped while this job ran")

    def _catch_up(self, job: Job) -> None:
        changes: dict[str, Any] = {}
        for ev in EventTail(self.run_dir(job.id) / EVENTS_FILE).read():
            changes.update(apply_event(job, ev))
        if changes:
            self.store.update(job.id, **changes)

    def _finish_interrupted(self, job: Job, why: str) -> None:
        self.store.update(job.id, expect=("running",), status="interrupted", pid=None,
                          finished_at=time.time(), eta_s=None,
                          error=f"{why}; POST /admin/jobs/{job.id}/resume continues it from "
                          "its last saved state")  # fmt: skip

    # ---------------------------------------------------------------- control

    def cancel(self, job_id: str) -> Job | None:
        """Queued -> cancelled now; running -> SIGTERM, cancelled when the child exits."""
        if self.store.update(job_id, expect=("queued",), status="cancelled",
                             finished_at=time.time()):  # fmt: skip
            return self.store.get(job_id)
        job = self.store.get(job_id)
        if job is None or job.status != "running":
            return job
        self.store.update(job_id, cancel_requested=True)
        proc = self._proc
        if self.current is not None and self.current.id == job_id and proc is not None:
            _signal_leader(proc.pid, signal.SIGTERM)
        return self.store.get(job_id)

    def requeue(self, job_id: str) -> bool:
        """Interrupted or cancelled -> queued, continuing from the saved state if any."""
        has_state = (self.run_dir(job_id) / "state.safetensors").is_file()
        done = self.store.update(job_id, expect=tuple(RESUMABLE), status="queued",
                                 resume=has_state, cancel_requested=False, error=None,
                                 finished_at=None, eta_s=None)  # fmt: skip
        if done:
            self.wake()
        return done

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        while not self._stopping:
            job = self.store.next_queued()
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 5.0)
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the runner itself must survive anything
                log.exception("job %s: runner error", job.id)
                self.store.update(job.id, status="failed", finished_at=time.time(), pid=None,
                                  error=f"runner error: {type(exc).__name__}: {exc}")  # fmt: skip
            finally:
                self.current, self._proc = None, None

    def _child_env(self, job: Job) -> dict[str, str]:
        # The child needs no secrets: it trains and writes files, nothing else.
        env = {k: v for k, v in os.environ.items() if k != "ALEXNET_ADMIN_TOKEN"}
        env["ALEXNET_HOME"] = str(self.home)
        # The bootstrap job runs while nothing is served yet: it may use every core.
        n = str(os.cpu_count() or 1) if job.source == "bootstrap" else str(self.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, ALEXNET_JOB_PARENT_PID=str(os.getpid()))
        env["PYTHONUNBUFFERED"] = "1"
        env["ALEXNET_WRITER_TAG"] = writer_tag(job.id)  # names its temp files: see cleanup()
        return env

    def cleanup(self, job: Job) -> None:
        """Once a job's processes are gone: remove the temp files a killed child left in
        its run folder and in the model store (tagged with the job, so another writer's
        save in progress is never touched)."""
        removed = remove_partial_saves(self.run_dir(job.id)) + remove_partial_saves(
            self.home / "models", writer=writer_tag(job.id)
        )
        if removed:
            log.warning("job %s: removed %d partial save(s) its process left", job.id, removed)

    async def _run(self, job: Job) -> None:
        run_dir = self.run_dir(job.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        events = run_dir / EVENTS_FILE
        tail = EventTail(events, events.stat().st_size if events.exists() else 0)
        argv = train_argv(job, run_dir)
        with (run_dir / LOG_FILE).open("ab") as logf:
            logf.write(f"$ {' '.join(argv)}\n".encode())
            logf.flush()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=asyncio.subprocess.STDOUT, env=self._child_env(job),
                start_new_session=True,  # its own group: a SIGKILL reaches torchrun and its ranks
            )  # fmt: skip
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.nice)
        self.current, self._proc = job, proc
        # step=0: progress shown from here on is this run's (a resumed job reports its own
        # first step, not the step its previous run stopped at).
        if not self.store.update(job.id, expect=("queued",), status="running", pid=proc.pid,
                                 started_at=job.started_at or time.time(), error=None,
                                 attempts=job.attempts + 1, step=0):  # fmt: skip
            # Cancelled between being picked and starting.
            _signal_group(proc.pid, signal.SIGTERM)
            await proc.wait()
            return
        log.info("job %s started (pid %d)", job.id, proc.pid)
        cancel_sent_at: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), POLL_S)
            changes: dict[str, Any] = {}
            for ev in tail.read():
                changes.update(apply_event(job, ev))
                _log_event(job, ev)
            if changes:
                self.store.update(job.id, **changes)
            if proc.returncode is not None:
                break
            fresh = self.store.get(job.id)
            if fresh is not None and fresh.cancel_requested:
                now = time.monotonic()
                if cancel_sent_at is None:
                    # (also when another process of the service took the DELETE)
                    _signal_leader(proc.pid, signal.SIGTERM)
                    cancel_sent_at = now
                elif now - cancel_sent_at > KILL_AFTER_S:
                    _signal_group(proc.pid, signal.SIGKILL)
        if self._stopping:
            return  # stop() records the job as interrupted
        await self._finished(job, proc.returncode, run_dir)

    async def _finished(self, job: Job, rc: int, run_dir: Path) -> None:
        self.cleanup(job)
        fresh = self.store.get(job.id)
        cancelled = fresh is not None and fresh.cancel_requested
        now = time.time()
        if rc == 0 and job.result_version:
            # Activation first, so `succeeded` is final when a client sees it.
            if self.on_success is not None:
                try:
                    await self.on_success(job)
                except Exception as exc:
                    log.exception("job %s: activation failed", job.id)
                    self.store.update(job.id, activation=f"activation failed: {exc}")
            self.store.update(job.id, status="succeeded", finished_at=time.time(), pid=None,
                              error=None)  # fmt: skip
            log.info("job %s succeeded: version %s", job.id, job.result_version)
        elif cancelled:
            self.store.update(job.id, status="cancelled", finished_at=now, pid=None, eta_s=None,
                              cancel_requested=False, error=None)  # fmt: skip
            log.info("job %s cancelled", job.id)
        elif rc == EXIT_INTERRUPTED:
            self._finish_interrupted(job, "the training process was stopped by a signal")
        else:
            reason = job.error or _log_reason(run_dir / LOG_FILE)
            self.store.update(
                job.id,
                status="failed",
                finished_at=now,
                pid=None,
                eta_s=None,
                error=f"{_exit_text(rc)}: {reason}" if reason else _exit_text(rc),
            )
            log.warning("job %s failed (%s)", job.id, _exit_text(rc))
        await asyncio.to_thread(self.retain)  # unlinking ~650 MB: off the serving loop

    def retain(self) -> None:
        """Apply ALEXNET_KEEP_JOB_STATE to the finished jobs' run state (app/storage.py)."""
        from app.storage import retain_job_state  # (storage builds on this module)

        try:
            retain_job_state(jobs=self.store, jobs_dir=self.jobs_dir,
                             keep_failed=self.keep_job_state)  # fmt: skip
        except OSError as exc:
            log.warning("job state retention: %s", exc)


def _log_event(job: Job, ev: dict[str, Any]) -> None:
    """A job's progress in the service log, in words: where it runs and each epoch."""
    kind = ev.get("type")
    with contextlib.suppress(KeyError, TypeError, ValueError):
        if kind == "start":
            d = ev["device"]
            log.info("job %s: training %s on %s (%d train / %d val images) on %s %s%s",
                     job.id, ev["config"]["arch"], ev["config"]["dataset"],
                     ev["split"]["train"], ev["split"]["val"], d["device"], d["precision"],
                     f", resumed at epoch {ev['resumed_from'][0]}" if ev.get("resumed_from")
                     else "")  # fmt: skip
        elif kind == "epoch_end":
            eta = (
                f", about {job.eta_s:.0f} s left"
                if job.eta_s and ev["epoch"] < ev["epochs"]
                else ""
            )
            log.info("job %s: epoch %d/%d val_loss %.4f val_top1 %.1f%% (%.0f img/s)%s",
                     job.id, ev["epoch"], ev["epochs"], ev["val_loss"], 100 * ev["val_top1"],
                     ev["images_per_s"], eta)  # fmt: skip


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the training process was killed by {name}"
    return f"the training process exited with status {rc}"


def _log_reason(path: Path, max_chars: int = 600) -> str:
    """The last meaningful line(s) of a child's log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    for ln in reversed(lines):
        if ln.startswith(("error:", "alexnet train: error:")) or "Error" in ln:
            return ln.strip()[:max_chars]
    return lines[-1].strip()[:max_chars] if lines else ""


def _signal_leader(pid: int, sig: int) -> None:
    """Ask the child itself to stop (`alexnet train`, or the CLI in front of torchrun, which
    forwards it to the ranks): it finishes its step, saves, then shuts its DataLoader
    workers down. Signalling the whole group would hit those workers first."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _is_our_child(pid: int, run_dir: Path) -> bool:
    """Whether `pid` is still a training child for `run_dir` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(run_dir).encode() in cmdline


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)


def set_parent_death_signal() -> None:
    """In a job's child: SIGTERM when the service that started it dies (Linux), so a killed
    server leaves no orphan training on; the child saves its state on SIGTERM."""
    parent = os.environ.pop("ALEXNET_JOB_PARENT_PID", None)  # not for torchrun's workers
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)
