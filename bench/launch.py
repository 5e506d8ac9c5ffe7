"""The real-server launcher the tests use (tests/helpers/server.py), for the benchmarks."""

from tests.helpers.server import REPO, Server, free_port, proc_status_kb

__all__ = ["REPO", "Server", "free_port", "proc_status_kb"]
