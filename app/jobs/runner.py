"""Admin training jobs run as child processes, one at a time: supervision, cancel, recovery.

A job is `alexnet train` run as a child process (torchrun when `nproc_per_node` > 1) in its
own process group, niced, with capped threads, writing into `$ALEXNET_HOME/jobs/<id>/` the
run folder of model/run.py: the progress events (tailed into the record), its stdout and
stderr, the resumable state and the loss plot. The runner never resumes on its own, except
the bootstrap job (the service needs its model). A child outlives a killed server only
briefly: it asks the kernel for SIGTERM when its parent dies (app/jobs/child.py), saves its
state and exits, and the next start marks the job interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from app.feedback import remove_snapshots
from app.jobs.child import PARENT_PID_ENV, writer_tag
from app.jobs.process import (
    exit_text,
    is_our_child,
    log_reason,
    signal_group,
    signal_leader,
    wait_gone,
)
from app.jobs.progress import EventTail, apply_event, log_event
from app.jobs.store import RESUMABLE, Job, JobStore
from app.settings import available_cpus
from model import run_state
from model.files import remove_partial_saves
from model.run import EVENTS_FILE, EXIT_INTERRUPTED, LOG_FILE, config_argv, option

log = logging.getLogger("app.jobs")  # (the name job lines have always had)

POLL_S: Final = 0.25
KILL_AFTER_S: Final = 120.0  # a cancelled child that has not saved by then is killed


def train_argv(job: Job, run_dir: Path) -> list[str]:
    """The `alexnet train` command line for `job` (resuming its run folder if asked)."""
    args = ["--resume", str(run_dir)] if job.resume else config_argv(job.config)
    if job.nproc_per_node > 1:
        args += ["--nproc-per-node", str(job.nproc_per_node)]
    for name, value in (job.launch or {}).items():  # nnodes, max_restarts, rdzv_endpoint
        if value is not None:
            args += [option(name), str(value)]
    return [sys.executable, "-m", "app.cli", "train", *args, "--run-dir", str(run_dir),
            "--events-file", str(run_dir / EVENTS_FILE), "--keep-active",
            "--writer-tag", writer_tag(job.id)]  # fmt: skip


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
            signal_leader(proc.pid, signal.SIGTERM)
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
            if job.pid and is_our_child(job.pid, self.run_dir(job.id)):
                log.warning("job %s: stopping the child %d left by a previous run", job.id,
                            job.pid)  # fmt: skip
                signal_group(job.pid, signal.SIGTERM)
                wait_gone(job.pid, self.stop_timeout_s)
            self.cleanup(job)
            self._catch_up(job)
            if job.result_version:
                remove_snapshots(self.home / "data", job.config)
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
            signal_leader(proc.pid, signal.SIGTERM)
        return self.store.get(job_id)

    def requeue(self, job_id: str) -> bool:
        """Interrupted or cancelled -> queued, continuing from the saved state if any."""
        has_state = run_state.exists(self.run_dir(job_id))
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
        n = str(available_cpus()) if job.source == "bootstrap" else str(self.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONUNBUFFERED="1")
        env[PARENT_PID_ENV] = str(os.getpid())  # app/jobs/child.py
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
            signal_group(proc.pid, signal.SIGTERM)
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
                log_event(job, ev)
            if changes:
                self.store.update(job.id, **changes)
            if proc.returncode is not None:
                break
            fresh = self.store.get(job.id)
            if fresh is not None and fresh.cancel_requested:
                now = time.monotonic()
                if cancel_sent_at is None:
                    # (also when another process of the service took the DELETE)
                    signal_leader(proc.pid, signal.SIGTERM)
                    cancel_sent_at = now
                elif now - cancel_sent_at > KILL_AFTER_S:
                    signal_group(proc.pid, signal.SIGKILL)
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
            reason = job.error or log_reason(run_dir / LOG_FILE)
            self.store.update(
                job.id,
                status="failed",
                finished_at=now,
                pid=None,
                eta_s=None,
                error=f"{exit_text(rc)}: {reason}" if reason else exit_text(rc),
            )
            log.warning("job %s failed (%s)", job.id, exit_text(rc))
        if self.store.get(job.id).status in ("succeeded", "failed"):  # type: ignore[union-attr]
            remove_snapshots(self.home / "data", job.config)  # (resumable ones keep theirs)
        await asyncio.to_thread(self.retain)  # unlinking ~650 MB: off the serving loop

    def retain(self) -> None:
        """Apply ALEXNET_KEEP_JOB_STATE to the finished jobs' run state (app/storage.py)."""
        from app.storage import retain_job_state  # (storage builds on this module)

        try:
            retain_job_state(jobs=self.store, jobs_dir=self.jobs_dir,
                             keep_failed=self.keep_job_state)  # fmt: skip
        except OSError as exc:
            log.warning("job state retention: %s", exc)
