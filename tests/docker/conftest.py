"""Prints the container test's timings (and the image size) at the end of the run."""

from __future__ import annotations

import json

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.helpers.docker import TIMINGS

    if TIMINGS:
        terminalreporter.write_line("container timings (s) and sizes (MB): " + json.dumps(TIMINGS))
