"""Trackers that cannot do their work say so once and leave the run alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from model.run import EpochEnd, Failed, Finished, Interrupted, Start, Tracking
from model.tracking import MLflowTracker, TensorBoardTracker, trackers

START = Start(config={"dataset": "synthetic", "arch": "alexnet"}, labels=["a", "b"],
              split={"train": 8, "val": 2}, device={"device": "cpu", "precision": "fp32"},
              epochs=1, steps_per_epoch=2)  # fmt: skip
END = EpochEnd(epoch=1, train_loss=1.0, val_loss=1.0, val_top1=0.5, val_top5=1.0, lr=0.1,
               grad_norm=1.0, images_per_s=10.0, epoch_time_s=1.0, epochs=1, improved=True,
               early_stop=False, next_lr=0.1)  # fmt: skip


def test_without_the_mlflow_client_the_run_is_told_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    t = MLflowTracker("http://127.0.0.1:9", run_dir=tmp_path, models_dir=tmp_path, timeout_s=30)
    news = t.handle(START) + t.handle(END)
    news += t.handle(Finished(version="v", metrics={}, stopped_early=False))
    (failed,) = news
    assert isinstance(failed, Tracking) and failed.backend == "mlflow"
    assert failed.status == "failed"
    assert "pip install 'alexnet-service[mlflow]'" in str(failed.error)
    assert t.handle(END) == []  # told once


def test_a_tensorboard_writer_that_fails_is_turned_off_and_told_once(tmp_path: Path) -> None:
    t = TensorBoardTracker(tmp_path)
    (ok,) = t.handle(START)
    assert isinstance(ok, Tracking) and ok.status == "ok" and ok.detail["logdir"] == str(tmp_path)

    class Broken:
        def add_scalar(self, *_: object) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    t.writer.close()
    t.writer = Broken()
    t.step(1, 0.5, 0.1)  # does not raise
    (failed,) = t.handle(END)
    assert isinstance(failed, Tracking) and failed.status == "failed"
    assert "No space left on device" in str(failed.error)
    assert t.writer is None and t.handle(END) == []


def test_nothing_is_tracked_unless_asked(tmp_path: Path) -> None:
    assert trackers(run_dir=tmp_path, models_dir=tmp_path, mlflow_uri=None,
                    mlflow_experiment=None, tensorboard=False, job_id=None) == []  # fmt: skip


def test_a_resumed_run_drops_the_steps_it_takes_again_from_tensorboard(tmp_path: Path) -> None:
    """Resumed at epoch 2 after 1 of its 4 steps (8 steps logged before the stop): steps
    6-8 are taken again, and only the second attempt's values are read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stopped = Interrupted(epoch=2, step=3, run_dir=str(tmp_path))
    first = TensorBoardTracker(tmp_path)
    first.handle(START.model_copy(update={"steps_per_epoch": 4, "epochs": 2}))
    for s in range(1, 9):
        first.step(s, 1.0, 0.1)
    first.handle(stopped)
    second = TensorBoardTracker(tmp_path)
    second.handle(START.model_copy(update={"steps_per_epoch": 4, "epochs": 2,
                                           "resumed_from": (2, 1)}))  # fmt: skip
    for s in range(6, 9):
        second.step(s, 2.0, 0.1)
    second.handle(Finished(version="v", metrics={}, stopped_early=False))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == list(range(1, 9))
    assert [s.value for s in loss] == [1.0] * 5 + [2.0] * 3


def test_a_run_stopped_before_its_mlflow_run_exists_is_not_a_tracking_failure(
    tmp_path: Path,
) -> None:
    """A failure before the run's start (a dataset that does not load): nothing was sent,
    so nothing failed, and the stop does not wait on the server."""
    t = MLflowTracker("http://127.0.0.1:9", run_dir=tmp_path, models_dir=tmp_path, timeout_s=30)
    assert t.handle(Failed(error="TrainingError: no such dataset")) == []
    assert t.error is None and t.run_id is None
