"""Elastic, fault-tolerant torchrun: a rank SIGKILLed in the middle of an epoch is
survived. torchrun (two gloo processes on this machine, c10d rendezvous) restarts the
group, every rank goes on from the last state saved every --checkpoint-every-steps, and
the run ends as if nothing happened: one version, a history without gaps or repeats, and
the optimizer steps of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import list_cards
from model.run_state import RunState, RunStateError
from tests.helpers.cli import REPO, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST = ["--image-size", "64", "--precision", "fp32", "--device", "cpu", "--workers", "0",
        "--batch-size", "4"]  # fmt: skip


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The training process of `rank` in this run (a torchrun worker names the run folder
    on its command line and has RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmd and f"RANK={rank}".encode() in env and b"app.cli" in cmd:
            return int(entry.name)
    return None


def test_a_killed_worker_is_survived_with_every_step_taken_once(tmp_path: Path) -> None:
    home, run_dir, ev_file = tmp_path / "home", tmp_path / "run", tmp_path / "events.jsonl"
    # 120 images: 96 train / 24 val; 2 ranks x batch 4: 12 steps an epoch (each at least
    # tens of ms: the gradients' all-reduce alone moves 228 MB).
    args = ["train", "--dataset", "synthetic:120", "--epochs", "2", *FAST,
            "--nproc-per-node", "2", "--max-restarts", "2", "--checkpoint-every-steps", "3",
            "--run-dir", str(run_dir), "--events-file", str(ev_file)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO,
                            env={**os.environ, "ALEXNET_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    saved_at = None  # the step of the last state saved before the kill
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and saved_at is None:
            try:
                state = RunState.read(run_dir)
            except RunStateError:  # not written yet
                state = None
            # Once the first checkpoint of epoch 1 is saved (its step 3 of 12), long before
            # the epoch's end: what the state says then is a lower bound of where the group
            # resumes (it may save once more before rank 1 is gone).
            if state is not None and state.epoch == 0 and state.step >= 3:
                pid = rank_pid(run_dir, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    saved_at = state.step
            elif state is not None and state.epoch > 0:
                pytest.fail("epoch 1 went by before rank 1 could be killed")
            time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # torchrun and its ranks too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert saved_at is not None, "rank 1 was never seen running"
    assert proc.returncode == 0, err[-4000:]

    # torchrun saw the worker die and restarted the group.
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode: -9" in err, err[-4000:]
    events = [json.loads(line) for line in ev_file.read_text().splitlines()]
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    epoch, step = starts[1]["resumed_from"]
    # The last saved step: a checkpoint of epoch 1, at or after the one seen before the kill.
    assert epoch == 1 and step % 3 == 0 and saved_at <= step < 12, (saved_at, step)
    assert starts[1]["world"] == 2
    # The first group's rank 0 saw its peer vanish (its last word); the second one's ended well.
    after = events[events.index(starts[1]) :]
    assert [e["type"] for e in after if e["type"] in ("failed", "finished")] == ["finished"]

    # One version, a history of epochs 1 and 2 once each, every step taken once.
    (card,) = list_cards(home / "models")
    assert [e["epoch"] for e in events if e["type"] == "epoch_end"] == [1, 2]
    state = RunState.read(run_dir)
    assert state.finished_version == card.version
    meta = state.meta
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    steps_per_epoch = starts[0]["steps_per_epoch"]
    assert steps_per_epoch == 12
    assert meta["scheduler"]["steps"] == 2 * steps_per_epoch  # the optimizer steps taken
    assert len(meta["step_losses"]) == 2 * steps_per_epoch


def test_launch_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for extra, message in (
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--nnodes", "3:2", "--rdzv-endpoint", "h:1", "--run-dir", "r"], "MIN <= MAX"),
        (["--nnodes", "x"], "give N or MIN:MAX"),
        (["--max-restarts", "-1"], "0 or more"),
        (["--rdzv-endpoint", "127.0.0.1:29400"], "needs --run-dir"),
    ):
        r = run_cli("train", "--dataset", "synthetic:80", *FAST, *extra, home=home, timeout=120)
        assert r.returncode == 1 and message in r.stderr, (extra, r.stderr)


@pytest.mark.parametrize("how", ["sigterm to the launcher", "a rank killed, no restarts"])
def test_a_stop_is_interrupted_and_a_crash_is_a_failure(tmp_path: Path, how: str) -> None:
    """Asked to stop, a torchrun run saves and exits EXIT_INTERRUPTED (75: resumable);
    a rank that dies with no restarts left fails it (1), though a state was saved."""
    home, run_dir = tmp_path / "home", tmp_path / "run"
    args = ["train", "--dataset", "synthetic:120", "--epochs", "2", *FAST,
            "--nproc-per-node", "2", "--checkpoint-every-steps", "2", "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO,
                            env={**os.environ, "ALEXNET_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if RunState.read(run_dir).step >= 2:
                    break
            except RunStateError:
                pass
            time.sleep(0.02)
        else:
            pytest.fail("no state was saved")
        if how.startswith("sigterm"):
            proc.send_signal(signal.SIGTERM)
        else:
            pid = rank_pid(run_dir, 1)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    state = RunState.read(run_dir)
    assert not state.finished and list_cards(home / "models") == []
    if how.startswith("sigterm"):
        assert proc.returncode == 75, err[-3000:]
        assert f"alexnet train --resume {run_dir}" in err
    else:
        assert proc.returncode == 1, err[-3000:]


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (torchrun's agent and its ranks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_node_replaced_by_a_new_one_joins_the_restarted_group(tmp_path: Path) -> None:
    """Two nodes (two torchrun agents on this machine, one rank each) meet at a c10d
    rendezvous; node B dies whole (agent and rank, as a lost pod) and a new node B is
    started with the same command, its restart count at 0 while node A's is 1. The new
    round meets in a store of its own, so the group resumes and finishes: one version,
    each epoch once."""
    from tests.helpers.server import free_port

    home, run_dir, port = tmp_path / "home", tmp_path / "run", free_port()
    # 120 images: 96 train; 2 nodes x batch 4: 12 steps an epoch.
    args = ["train", "--dataset", "synthetic:120", "--epochs", "2", *FAST,
            "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "2",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--checkpoint-every-steps", "3",
            "--run-dir", str(run_dir), "--events-file", str(tmp_path / "events.jsonl")]  # fmt: skip

    def node(name: str) -> subprocess.Popen[str]:
        with (tmp_path / f"{name}.out").open("w") as out:
            return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO,
                                    env={**os.environ, "ALEXNET_HOME": str(home),
                                         "OMP_NUM_THREADS": "1"},  # (2 nodes, 2 cores)
                                    stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)  # fmt: skip

    # Node A first, and B once A hosts the rendezvous: the node hosting it is the one
    # that must stay (as pod 0 of the Kubernetes Job does), so B is the one that dies.
    nodes = [node("a")]
    try:
        deadline = time.monotonic() + 300
        while not _listening(port):
            assert nodes[0].poll() is None and time.monotonic() < deadline, "no rendezvous"
            time.sleep(0.05)
        nodes.append(node("b"))
        while True:
            try:
                if RunState.read(run_dir).step >= 3:
                    break
            except RunStateError:
                pass
            assert time.monotonic() < deadline, "no state was saved"
            time.sleep(0.02)
        for pid in [nodes[1].pid, *_descendants(nodes[1].pid)]:  # node B is gone, at once
            os.kill(pid, signal.SIGKILL)
        nodes[1].wait()
        nodes.append(node("b2"))
        for p in (nodes[0], nodes[2]):
            p.wait(timeout=300)
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = {n: (tmp_path / f"{n}.out").read_text()[-3000:] for n in ("a", "b2")}
    assert nodes[0].returncode == 0 and nodes[2].returncode == 0, logs
    (card,) = list_cards(home / "models")
    state = RunState.read(run_dir)
    assert state.finished_version == card.version
    assert [h["epoch"] for h in state.meta["history"]] == [1, 2]
    assert state.meta["scheduler"]["steps"] == 2 * 12
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["world"] == 2 and starts[1]["resumed_from"][0] == 1
    assert not [e for e in events if e["type"] == "interrupted"]  # a death, not a stop
