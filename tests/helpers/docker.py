"""What the container tests measure, printed at the end of the run (tests/docker/conftest.py)."""

TIMINGS: dict[str, float] = {}
