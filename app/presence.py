"""Which servers use an ALEXNET_HOME: each running service leaves a small file under
`$ALEXNET_HOME/servers/` (its host, pid, whether it follows ACTIVE, the version it serves),
so a CLI command can say whether a server will follow a new ACTIVE (`alexnet models
activate`) and nothing deletes what one is serving (`alexnet models delete`, `alexnet gc`,
`DELETE /admin/models/{version}`).

Replicas in containers share the folder but not a pid namespace (each may be pid 1): a
record from this host and pid namespace is judged by its process; any other by its
heartbeat, which a live server renews every `HEARTBEAT_S`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Final

from model.files import atomic_write_bytes

SERVERS_DIR: Final = "servers"
HEARTBEAT_S: Final = 15.0
STALE_S: Final = 4 * HEARTBEAT_S  # a record not renewed for this long is a dead server's
FORGET_S: Final = 24 * 3600.0  # another host's dead record is removed after this


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), which tells a live server from a
    reused pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the comm field


def _pid_namespace() -> str:
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return ""


def _here() -> tuple[str, str]:
    return socket.gethostname(), _pid_namespace()


def announce(home: Path, *, watch_active_s: float) -> Path:
    """Record this process as a server of `home`; returns the file to `update`/`withdraw`."""
    folder = home / SERVERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    host, ns = _here()
    path = folder / f"{host}-{pid}-{secrets.token_hex(3)}.json"
    now = time.time()
    record = {"host": host, "pid_ns": ns, "pid": pid, "start_ticks": _start_ticks(pid),
              "started_at": now, "heartbeat_at": now, "watch_active_s": watch_active_s,
              "serving": None}  # fmt: skip
    atomic_write_bytes(path, json.dumps(record).encode())
    return path


def update(path: Path, **fields: Any) -> None:
    """Change this server's record (e.g. `serving=version` after a swap) and renew its
    heartbeat."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    record.update(fields, heartbeat_at=time.time())
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, json.dumps(record).encode())


def withdraw(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def live_servers(home: Path) -> list[dict[str, Any]]:
    """The servers now running on `home`; records of dead ones are removed."""
    out = []
    folder = home / SERVERS_DIR
    if not folder.is_dir():
        return []
    host, ns = _here()
    now = time.time()
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_bytes())
            pid, beat = int(record["pid"]), float(record["heartbeat_at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.get("host") == host and record.get("pid_ns") == ns:
            alive = _alive(pid, record.get("start_ticks"))
            if not alive:
                withdraw(path)
        else:
            alive = now - beat < STALE_S
            if now - beat > FORGET_S:
                withdraw(path)
        if alive:
            out.append(record)
    return out


def serving_versions(home: Path) -> set[str]:
    """The versions the live servers of `home` are serving."""
    return {str(r["serving"]) for r in live_servers(home) if r.get("serving")}


def _alive(pid: int, start_ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return start_ticks is None or _start_ticks(pid) == start_ticks
