"""app/training.py: what the torchrun ranks are started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.training import Launch, torchrun_argv


def test_the_ranks_get_the_options_without_nproc_and_with_the_run_folder() -> None:
    argv = ["train", "--dataset", "synthetic", "--nproc-per-node", "2", "--epochs", "3"]
    assert torchrun_argv(argv, Path("/r")) == ["train", "--dataset", "synthetic", "--epochs",
                                              "3", "--run-dir", "/r", "--resume-if-saved"]  # fmt: skip
    assert torchrun_argv(["train", "--nproc-per-node=2", "--run-dir=/x"], Path("/r")) == [
        "train", "--run-dir=/x", "--resume-if-saved"]  # fmt: skip


def test_the_launchers_options_stay_with_the_launcher() -> None:
    argv = ["train", "--dataset", "synthetic", "--nnodes", "1:2", "--max-restarts=3",
            "--rdzv-endpoint", "head:29400", "--checkpoint-every-steps", "50"]  # fmt: skip
    assert torchrun_argv(argv, Path("/shared/run")) == [
        "train", "--dataset", "synthetic", "--checkpoint-every-steps", "50",
        "--run-dir", "/shared/run", "--resume-if-saved"]  # fmt: skip
    opts = Launch("1:2", 3, "head:29400").torchrun_options(Path("/shared/run"))
    assert opts == ["--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=run",
                    "--nnodes=1:2", "--max-restarts=3"]  # fmt: skip
    assert Launch(max_restarts=1).torchrun_options(Path("/r"))[0] == "--standalone"


@pytest.mark.parametrize("given", [["--base", "active"], ["--base=active"], ["--resume", "active"]])
def test_the_base_is_resolved_once_for_every_rank(given: list[str]) -> None:
    """`active` may change while the ranks start: they all get the version this process
    resolved."""
    argv = ["train", "--dataset", "synthetic", *given, "--nproc-per-node", "2"]
    out = torchrun_argv(argv, Path("/r"), base="20261201-000000-ab12")
    assert "active" not in out and "--resume" not in out
    assert out[-3:-1] == ["--base", "20261201-000000-ab12"] and out.count("--base") == 1


def test_a_resumed_run_keeps_its_resume() -> None:
    argv = ["train", "--resume", "/runs/a", "--nproc-per-node", "2"]
    assert torchrun_argv(argv, Path("/runs/a")) == ["train", "--resume", "/runs/a", "--run-dir",
                                                    "/runs/a", "--resume-if-saved"]  # fmt: skip
