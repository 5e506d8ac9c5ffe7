"""The job child as a process: signals to it and its group, whether a pid is still our
child, and what its exit status and log say went wrong."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the training process was killed by {name}"
    return f"the training process exited with status {rc}"


def log_reason(path: Path, max_chars: int = 600) -> str:
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


def signal_leader(pid: int, sig: int) -> None:
    """Ask the child itself to stop (`alexnet train`, or the CLI in front of torchrun, which
    forwards it to the ranks): it finishes its step, saves, then shuts its DataLoader
    workers down. Signalling the whole group would hit those workers first."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def is_our_child(pid: int, run_dir: Path) -> bool:
    """Whether `pid` is still a training child for `run_dir` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(run_dir).encode() in cmdline


def wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
