"""A real `alexnet serve` process on a free port: for the tests about the server itself
and for the benchmarks (bench/launch.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tests.helpers.cli import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status_kb(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status (VmRSS, VmHWM...), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


class Server:
    def __init__(self, home: Path, **env: str) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ALEXNET_HOME": str(home), "ALEXNET_PORT": str(self.port),
                    "ALEXNET_BOOTSTRAP": "none", "ALEXNET_LOG_LEVEL": "warning", **env}  # fmt: skip
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout_s: float = 120) -> Server:
        with self.log.open("ab") as home_log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO,
                                         env=self.env, stdout=home_log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not up in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def terminate(self, timeout_s: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def __enter__(self) -> Server:
        return self if self.proc is not None else self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
