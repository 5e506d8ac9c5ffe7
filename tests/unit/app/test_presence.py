"""Server records under $ALEXNET_HOME/servers/: replicas in other containers (another host
name, another pid namespace, possibly the same pid) are judged by their heartbeat, local
ones by their process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from app.presence import FORGET_S, STALE_S, announce, live_servers, serving_versions, update


def foreign(home: Path, name: str, *, pid: int, beat_age_s: float, serving: str) -> Path:
    path = home / "servers" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "host": name, "pid_ns": "pid:[1]", "pid": pid, "start_ticks": "1",
        "heartbeat_at": time.time() - beat_age_s, "watch_active_s": 2, "serving": serving}))  # fmt: skip
    return path


def test_replicas_with_the_same_pid_do_not_collide(tmp_path: Path) -> None:
    foreign(tmp_path, "replica-a", pid=1, beat_age_s=1, serving="v1")
    foreign(tmp_path, "replica-b", pid=1, beat_age_s=1, serving="v2")
    assert serving_versions(tmp_path) == {"v1", "v2"}


def test_a_replica_that_stopped_beating_is_not_live(tmp_path: Path) -> None:
    quiet = foreign(tmp_path, "quiet", pid=1, beat_age_s=STALE_S + 5, serving="v1")
    gone = foreign(tmp_path, "gone", pid=1, beat_age_s=FORGET_S + 5, serving="v2")
    assert live_servers(tmp_path) == []
    assert quiet.exists() and not gone.exists()  # forgotten only after a day


def test_local_records_follow_their_process(tmp_path: Path) -> None:
    mine = announce(tmp_path, watch_active_s=0)
    update(mine, serving="v3")
    [record] = live_servers(tmp_path)
    assert record["pid"] == os.getpid() and record["serving"] == "v3"
    # the same record for a process that has exited is removed
    data = json.loads(mine.read_text())
    data["start_ticks"] = "0"  # a different process under a reused pid
    mine.write_text(json.dumps(data))
    assert live_servers(tmp_path) == [] and not mine.exists()
