"""bench/overload.py, briefly: the script that measures sustained overload keeps working,
and what it measures holds in the small (every request answered once, refusals are 429
with Retry-After, nothing else fails, memory settles). The 2-minute figures are in
docs/benchmarks.md; nothing here depends on timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_overload_bench_runs_and_sheds_load_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "bench/overload.py", "--small", "--seconds", "6",
         "--capacity-seconds", "3", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RSS before MB" in run.stdout  # the tables are printed
    report = json.loads(out.read_text())
    assert report["answers"] == report["sent"]  # exactly one answer per request
    assert set(report["statuses"]) <= {"200", "429"}, report["statuses"]
    assert report["statuses"].get("200", 0) > 0
    assert report["retry_after_on_every_429"]
    # After the load, the server answers again (how soon, against its idle latency, is a
    # figure for the report: it depends on the machine)
    assert report["after_load_statuses"].get("200", 0) >= 1, report["after_load_statuses"]
    assert set(report["after_load_statuses"]) == {"200"}
    assert report["rss_after_mb"] - report["rss_before_mb"] < 300
