"""Files that survive crashes: durable writes, atomic replacement, partial saves named after
their writer (and cleaned up by writer), and the run folder's lock.

A reader sees a file's old content or its new content, never a mix; a crash mid-save
leaves a hidden `.tmp-*` file or folder that `remove_partial_saves` finds by its writer.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

TMP_PREFIX: Final = ".tmp-"
RUN_LOCK_FILE: Final = "run.lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it (the caller renames it into place)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(tmp_name(path.name))
    try:
        write_file_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


_writer_tag = ""


def set_writer_tag(tag: str) -> None:
    """Name this process's temp files after `tag` (an admin job's, given to its child as
    `--writer-tag`) instead of its pid, so the job runner can remove a dead child's
    leftovers without touching a live writer's save in progress."""
    global _writer_tag
    _writer_tag = re.sub(r"[^A-Za-z0-9_-]", "", tag)


def tmp_name(name: str) -> str:
    """A hidden temp name that says who writes it: the writer tag or the process id."""
    return f"{TMP_PREFIX}{name}.{_writer_tag or f'p{os.getpid()}'}.{secrets.token_hex(4)}"


def remove_partial_saves(folder: Path, *, writer: str | None = None,
                         older_than_s: float = 0.0) -> int:  # fmt: skip
    """Delete temp folders and files left in `folder` by a crash mid-save; returns how many.

    `writer`: only those of that writer tag (a job whose process died). `older_than_s`:
    only those untouched for that long, so another live process's save in progress (a
    trainer sharing the folder with this replica) is left alone."""
    n = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for child in folder.iterdir():
        if not child.name.startswith(TMP_PREFIX):
            continue
        if writer is not None and f".{writer}." not in child.name:
            continue
        try:
            if older_than_s and now - child.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue  # renamed into place meanwhile
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Held by the process training in `run_dir` (an advisory lock the kernel drops when the
    process dies), so nothing deletes a run's state under it and no second process trains
    in the same folder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK_FILE, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RunFolderBusy(
                f"{run_dir}: another process is training in this run folder"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def run_in_use(run_dir: Path) -> bool:
    """Whether a live process holds `run_lock(run_dir)`."""
    import fcntl

    path = run_dir / RUN_LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False
