"""What runs in a job's child process, whatever started it: the half of the job contract
that lives in `alexnet train` (the other half is model/run.py's events and exit codes).

The runner (app/jobs/runner.py) starts `alexnet train ... --writer-tag job-<id>` with
`PARENT_PID_ENV` set to its own pid; the child calls `set_parent_death_signal()` first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Final

PARENT_PID_ENV: Final = "ALEXNET_JOB_PARENT_PID"


def writer_tag(job_id: str) -> str:
    """The tag a job's child gives its temp files (model/files.py: `set_writer_tag`),
    so the runner can remove a dead child's leftovers and nobody else's."""
    return f"job-{job_id}"


def set_parent_death_signal() -> None:
    """In a job's child: SIGTERM when the service that started it dies (Linux), so a killed
    server leaves no orphan training on; the child saves its state on SIGTERM."""
    parent = os.environ.pop(PARENT_PID_ENV, None)  # not for torchrun's workers
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)
