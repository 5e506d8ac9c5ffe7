"""Which servers use an ALEXNET_HOME: each running service leaves a small file under
`$ALEXNET_HOME/servers/` (its pid, whether it follows ACTIVE, the version it serves), so a
CLI command can say whether a server will follow a new ACTIVE (`alexnet models activate`)
and never deletes what one is serving (`alexnet models delete`, `alexnet gc`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from model.checkpoint import atomic_write_bytes

SERVERS_DIR = "servers"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), which tells a live server from a
    reused pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the comm field


def announce(home: Path, *, watch_active_s: float) -> Path:
    """Record this process as a server of `home`; returns the file to `withdraw`."""
    folder = home / SERVERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = folder / f"{pid}.json"
    record = {"pid": pid, "start_ticks": _start_ticks(pid), "started_at": time.time(),
              "watch_active_s": watch_active_s, "serving": None}  # fmt: skip
    atomic_write_bytes(path, json.dumps(record).encode())
    return path


def update(path: Path, **fields: Any) -> None:
    """Change this server's record (e.g. `serving=version` after a swap)."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    record.update(fields)
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, json.dumps(record).encode())


def serving_versions(home: Path) -> set[str]:
    """The versions the live servers of `home` are serving."""
    return {str(r["serving"]) for r in live_servers(home) if r.get("serving")}


def withdraw(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def live_servers(home: Path) -> list[dict[str, Any]]:
    """The servers now running on `home` (stale records of killed ones are removed)."""
    out = []
    folder = home / SERVERS_DIR
    if not folder.is_dir():
        return []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_bytes())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid, record.get("start_ticks")):
            out.append(record)
        else:
            withdraw(path)
    return out


def _alive(pid: int, start_ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return start_ticks is None or _start_ticks(pid) == start_ticks
