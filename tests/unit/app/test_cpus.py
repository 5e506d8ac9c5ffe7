"""How many CPUs the threads are sized for: the affinity, capped by a cgroup v2 quota."""

from __future__ import annotations

import os
from pathlib import Path

from app.settings import Settings, available_cpus


def test_a_cgroup_quota_caps_the_cpus(tmp_path: Path) -> None:
    own = len(os.sched_getaffinity(0))
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert available_cpus(f) == own
    f.write_text("50000 100000\n")  # half a CPU: still one thread
    assert available_cpus(f) == 1
    f.write_text(f"{own * 10 * 100000} 100000\n")  # a quota above the affinity
    assert available_cpus(f) == own
    assert available_cpus(tmp_path / "absent") == own  # no cgroup v2: the affinity
    f.write_text("garbage\n")
    assert available_cpus(f) == own


def test_job_threads_default_to_all_available_cpus_but_one() -> None:
    assert Settings().effective_job_threads == max(1, available_cpus() - 1)
    assert Settings(job_threads=3).effective_job_threads == 3
