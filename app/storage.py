"""Disk use under ALEXNET_HOME: what each version and job folder holds, what is still
needed, and deleting what is not. One code path for `DELETE /admin/models/{version}`,
`DELETE /admin/jobs/{id}?purge=true`, the job-state retention and `alexnet gc`.

Needed, and never removed here: the ACTIVE version, every version a server is serving, the
base of a job that is queued, running or resumable, and the run state of resumable jobs
(interrupted, cancelled) and of unfinished `alexnet train` runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from app.feedback import remove_snapshots
from app.jobs.store import RESUMABLE, Job, JobStore
from model import quantize
from model.checkpoint import (
    CheckpointError,
    iter_version_dirs,
    read_active,
    stored_version_dir,
)
from model.files import fsync_dir, run_in_use
from model.run import BEST_FILE, STATE_FILE
from model.run_state import RunState, RunStateError

log = logging.getLogger(__name__)

RUN_STATE_FILES: Final = (STATE_FILE, BEST_FILE)  # a run's resumable state: ~650 MB at 224 px
STALE_PARTIAL_S: Final = 600.0  # a partial save this old has no live writer


class InUse(Exception):
    """A version or a job's state that something still needs; the message says what."""


@dataclass
class Freeable:
    kind: str  # version | job_state | run_state | partial_save
    name: str
    path: str
    bytes: int
    why: str


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / f).stat().st_size
    return total


def run_state_bytes(run_dir: Path) -> int:
    return sum(tree_bytes(run_dir / f) for f in RUN_STATE_FILES if (run_dir / f).exists())


# ----------------------------------------------------------------------------- versions


def version_users(
    version: str, *, models_dir: Path, jobs: JobStore, serving: Iterable[str]
) -> list[str]:
    """Why `version` may not be deleted (empty: nothing needs it)."""
    why = []
    if read_active(models_dir) == version:
        why.append("it is the ACTIVE version")
    if version in set(serving):
        why.append("a server is serving it")
    for job in jobs.list(limit=10_000):
        if job.config.get("base") == version and (
            job.status in ("queued", "running") or (job.status in RESUMABLE and not job.purged_at)
        ):
            why.append(f"job {job.id} ({job.status}) fine-tunes from it")
    return why


def delete_version(
    version: str,
    *,
    models_dir: Path,
    jobs: JobStore,
    serving: Iterable[str],
    cache_dir: Path | None = None,
) -> int:
    """Delete a stored version that nothing needs, and its compiled int8 programs under
    `cache_dir`; returns the bytes freed. Raises CheckpointError for an unknown version and
    InUse for one still needed.

    The folder is first renamed to a hidden temp name, so a crash midway leaves no
    half-deleted version that looks loadable (the leftover is removed as a partial save)."""
    path = stored_version_dir(models_dir, version)
    users = version_users(version, models_dir=models_dir, jobs=jobs, serving=serving)
    if users:
        raise InUse(f"version {version} is in use: {'; '.join(users)}")
    size = tree_bytes(path)
    doomed = models_dir / f".tmp-{version}.deleting.{secrets.token_hex(4)}"
    os.rename(path, doomed)
    fsync_dir(models_dir)
    shutil.rmtree(doomed, ignore_errors=True)
    size += quantize.remove_cached(cache_dir, version)
    log.info("deleted model version %s (%d bytes)", version, size)
    return size


# ----------------------------------------------------------------------------- job state


def purge_run_state(run_dir: Path) -> int:
    """Delete a run's resumable state (the record, log, events and loss plot stay)."""
    freed = 0
    for name in RUN_STATE_FILES:
        path = run_dir / name
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            freed += size
    return freed


def purge_job(job: Job, *, jobs: JobStore, jobs_dir: Path) -> int:
    """A job's resumable state, deleted on request: only once its process is gone. A
    cancelled or interrupted job then cannot resume (its record says why)."""
    if job.status in ("queued", "running"):
        raise InUse(f"job {job.id} is {job.status}: cancel it first, then purge it")
    if run_in_use(jobs_dir / job.id):
        raise InUse(f"a process is training in {jobs_dir / job.id} (a resume by hand?)")
    freed = purge_run_state(jobs_dir / job.id)
    remove_snapshots(jobs_dir.parent / "data", job.config)  # it cannot resume: no reader left
    jobs.update(job.id, purged_at=time.time())
    return freed


def retain_job_state(*, jobs: JobStore, jobs_dir: Path, keep_failed: int) -> int:
    """The retention policy (ALEXNET_KEEP_JOB_STATE): a succeeded job's run state is
    deleted (its run is finished and can never continue); the newest `keep_failed`
    failed jobs keep theirs, for `alexnet train --resume` by hand; -1 keeps everything.
    Resumable jobs keep theirs. Returns the bytes freed."""
    if keep_failed < 0:
        return 0
    freed = 0
    for job, _why in _expired_job_states(jobs, jobs_dir, keep_failed):
        freed += purge_run_state(jobs_dir / job.id)
        jobs.update(job.id, purged_at=time.time())
    if freed:
        log.info("job state retention freed %d bytes", freed)
    return freed


def _expired_job_states(jobs: JobStore, jobs_dir: Path, keep_failed: int) -> list[tuple[Job, str]]:
    """Finished jobs whose run state the retention policy drops, with why. A failed job
    counts toward the N kept only while it still has its state; a folder a process is
    training in (`alexnet train --resume` by hand) is never touched."""
    out = []
    failed_kept = 0
    for job in jobs.list(limit=100_000):  # newest first
        if job.status not in ("succeeded", "failed"):
            continue
        run_dir = jobs_dir / job.id
        if not run_state_bytes(run_dir) or run_in_use(run_dir):
            continue
        if job.status == "failed":
            if keep_failed < 0 or failed_kept < keep_failed:
                failed_kept += 1
                continue
            out.append((job, f"a failed job beyond the newest {keep_failed} kept"))
        else:
            out.append((job, f"its run finished as version {job.result_version}"))
    return out


# ----------------------------------------------------------------------------- gc


def _finished_cli_run(run_dir: Path) -> bool:
    try:
        return RunState.read(run_dir).finished
    except RunStateError:
        return False  # unreadable: leave it to the user


def collect(
    *,
    home: Path,
    jobs: JobStore,
    serving: Iterable[str],
    keep_failed: int,
    keep_versions: int | None = None,
) -> list[Freeable]:
    """What `alexnet gc` would free, with why each item is not needed."""
    serving = set(serving)
    out: list[Freeable] = []
    models_dir, jobs_dir, runs_dir = home / "models", home / "jobs", home / "runs"
    # Run state of finished jobs, as the retention policy would leave it.
    known_jobs = {job.id for job in jobs.list(limit=100_000)}
    for job, why in _expired_job_states(jobs, jobs_dir, keep_failed):
        run_dir = jobs_dir / job.id
        out.append(Freeable("job_state", job.id, str(run_dir), run_state_bytes(run_dir), why))
    # `alexnet train` runs that finished (an unfinished one can still be resumed).
    if runs_dir.is_dir():
        for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
            if run_state_bytes(run) and not run_in_use(run) and _finished_cli_run(run):
                out.append(Freeable("run_state", run.name, str(run), run_state_bytes(run),
                                    "the run finished and registered its version"))  # fmt: skip
    # Partial saves with no live writer.
    now = time.time()
    folders = [models_dir, runs_dir, *(jobs_dir / j for j in known_jobs)]
    for folder in folders:
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if child.name.startswith(".tmp-") and now - child.stat().st_mtime > STALE_PARTIAL_S:
                    out.append(Freeable("partial_save", child.name, str(child), tree_bytes(child),
                                        "left by a save or delete that never finished"))  # fmt: skip
    # Versions past the newest `keep_versions` that nothing needs (only when asked).
    if keep_versions is not None:
        dirs = list(iter_version_dirs(models_dir))  # oldest first (names sort by time)
        for d in dirs[: max(0, len(dirs) - keep_versions)]:
            if not version_users(d.name, models_dir=models_dir, jobs=jobs, serving=serving):
                out.append(Freeable("version", d.name, str(d), tree_bytes(d),
                                    f"older than the newest {keep_versions} and not in use"))  # fmt: skip
    return out


def free(items: Iterable[Freeable], *, home: Path, jobs: JobStore, serving: Iterable[str]) -> int:
    """Delete what `collect` listed, re-checking each version; returns the bytes freed."""
    freed = 0
    for item in items:
        path = Path(item.path)
        try:
            if item.kind == "version":
                freed += delete_version(item.name, models_dir=home / "models", jobs=jobs,
                                        serving=serving, cache_dir=home / "cache")  # fmt: skip
            elif item.kind in ("job_state", "run_state"):
                if run_in_use(path):
                    raise InUse(f"a process is training in {path}")
                freed += purge_run_state(path)
                if item.kind == "job_state":
                    jobs.update(item.name, purged_at=time.time())
            else:
                size = tree_bytes(path)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                freed += size
        except (InUse, CheckpointError, OSError) as exc:
            log.warning("gc: kept %s %s: %s", item.kind, item.name, exc)
    return freed


def as_dicts(items: Iterable[Freeable]) -> list[dict[str, object]]:
    return [asdict(i) for i in items]
