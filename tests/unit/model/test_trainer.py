"""The training engine: scripted schedules, resume exactness, augmentation boundaries."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from model import trainer as T
from model.config import TrainConfig
from model.data import TrainAugment, load_dataset
from model.run import PLOT_FILE, Event
from model.schedules import MIN_LR, EarlyStopping, LRPolicy
from model.trainer import Trainer, TrainingError, TrainingInterrupted

TINY = {"dataset": "synthetic:120", "image_size": 64, "batch_size": 16, "epochs": 2,
        "precision": "fp32", "device": "cpu", "workers": 0}  # fmt: skip


def _as_dicts(events: list[dict[str, Any]]) -> Any:
    """A trainer callback that keeps each event as the JSON object it travels as."""
    return lambda ev: events.append(ev.model_dump())


def _trainer(tmp_path: Path, callback: Any = None, **kw: Any) -> Trainer:
    cfg = TrainConfig(**{**TINY, **kw})
    return Trainer(cfg, data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                   run_dir=tmp_path / "run", callback=callback)  # fmt: skip


def test_early_stopping_follows_the_seeds_semantics() -> None:
    es = EarlyStopping(patience=3, delta=0.0)
    improved = [es(v) for v in [1.0, 0.9, 0.95, 0.92, 0.91]]
    assert improved == [True, True, False, False, False]
    assert es.early_stop and es.counter == 3
    # as in the seed, a loss equal to the best is not "worse": it resets the counter
    es = EarlyStopping(patience=2)
    assert [es(v) for v in [1.0, 1.1, 1.0]] == [True, False, True] and es.counter == 0
    # delta: an improvement smaller than delta counts as none
    es = EarlyStopping(patience=2, delta=0.1)
    assert [es(v) for v in [1.0, 0.95, 0.8]] == [True, False, True]
    assert es.counter == 0 and not es.early_stop


def _lrs(kind: str, losses: list[float], top1s: list[float]) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    policy = LRPolicy(opt, kind)
    out = []
    for loss, top1 in zip(losses, top1s, strict=True):
        policy.step(loss, top1)
        out.append(round(policy.lr, 10))
    return out


def test_plateau_halves_after_three_epochs_without_a_lower_loss() -> None:
    lrs = _lrs("plateau", [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5], [0.0] * 10)
    assert lrs == [0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.005, 0.0025]


def test_step_divides_by_ten_when_validation_accuracy_stalls() -> None:
    lrs = _lrs("step", [1.0] * 6, [0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert lrs == [0.01, 0.01, 0.01, 0.01, 0.001, 0.001]


def test_cosine_decays_per_step_to_zero_ignores_validation_and_resumes_exactly() -> None:
    def policy() -> LRPolicy:
        pol = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), "cosine")
        pol.total_steps = 8
        return pol

    a = policy()
    lrs = [a.lr]
    for i in range(8):
        a.optimizer.step()
        a.batch_step()
        if i == 3:
            a.step(val_loss=1.0, val_top1=0.0)  # an epoch end: no effect on cosine
        lrs.append(a.lr)
    assert lrs[0] == 0.01 and lrs[4] == pytest.approx(0.005) and lrs[8] == pytest.approx(0.0)
    assert all(x > y for x, y in itertools.pairwise(lrs))
    b = policy()  # a resumed run: state after 3 steps, then 5 more
    for _ in range(3):
        b.optimizer.step()
        b.batch_step()
    c = policy()
    c.load_state_dict(b.state_dict())
    c.optimizer.param_groups[0]["lr"] = b.lr  # the optimizer's own state carries the lr
    for _ in range(5):
        c.optimizer.step()
        c.batch_step()
    assert c.lr == pytest.approx(lrs[8], abs=1e-12)
    TrainConfig(dataset="synthetic", scheduler="cosine", patience=1)  # no patience to outlast


def test_learning_rate_never_goes_below_min_lr() -> None:
    assert _lrs("step", [1.0] * 40, [0.5] * 40)[-1] == MIN_LR


def test_early_stopping_must_be_more_patient_than_the_scheduler() -> None:
    with pytest.raises(ValueError, match="greater than the plateau"):
        TrainConfig(dataset="synthetic", patience=3)
    TrainConfig(dataset="synthetic", scheduler="step", patience=3)


@pytest.mark.parametrize("bad", ["../etc", "/abs", "imagefolder:../x", "imagefolder:", "mnist"])
def test_datasets_are_names_not_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        TrainConfig(dataset=bad)


def test_split_is_seeded_and_reproducible(tmp_path: Path) -> None:
    a = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=3)
    b = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=3)
    c = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=4)
    assert a.val.indices == b.val.indices != c.val.indices
    assert len(a.val) == 20 and not set(a.val.indices) & set(a.train.indices)
    assert a.split == {"n": 100, "val_split": 0.2, "seed": 3, "train": 80, "val": 20}


def test_validation_never_sees_augmentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    augmented: list[int] = []
    real_call = TrainAugment.__call__

    def spy(self: TrainAugment, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        augmented.append(x.shape[0])
        return real_call(self, x, g)

    monkeypatch.setattr(TrainAugment, "__call__", spy)
    events: list[dict[str, Any]] = []
    result = _trainer(tmp_path, _as_dicts(events), augment=True).fit()
    assert sum(augmented) == 96 * 2  # the 96 training images, twice; never the 24 val ones
    assert [e["type"] for e in events].count("epoch_end") == 2
    assert result.history[0]["val_loss"] > 0


def test_history_plot_version_and_events(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    result = _trainer(tmp_path, _as_dicts(events)).fit()
    keys = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "grad_norm",
            "images_per_s", "epoch_time_s"}  # fmt: skip
    assert all(keys <= set(h) for h in result.history)
    assert (tmp_path / "run" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "models" / result.card.version / "weights.safetensors").is_file()
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.card.metrics["val_loss"] == best["val_loss"]
    assert result.card.labels[0] == "circle"
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "finished" and "step" in types
    step = next(e for e in events if e["type"] == "step")
    assert {"epoch", "step", "steps", "images_per_s", "eta_s", "loss"} <= set(step)


def test_non_finite_loss_stops_the_run_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ce = torch.nn.functional.cross_entropy

    def nan_loss(*a: Any, **k: Any) -> torch.Tensor:
        return real_ce(*a, **k) * float("nan")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss)  # (everywhere)
    events: list[dict[str, Any]] = []
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1"):
        _trainer(tmp_path, _as_dicts(events)).fit()
    assert events[-1]["type"] == "failed"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("augment", [False, True])
def test_resume_after_an_interrupted_epoch_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, augment: bool
) -> None:
    full = _trainer(tmp_path / "a", augment=augment).fit()

    holder: dict[str, Trainer] = {}

    def stop_mid_epoch(ev: Event) -> None:
        if ev.type == "step" and ev.epoch == 1 and ev.step >= 3:
            holder["t"].request_stop()

    t = _trainer(tmp_path / "b", stop_mid_epoch, augment=augment)
    holder["t"] = t
    t_events = T.EVENT_INTERVAL_S
    T.EVENT_INTERVAL_S = 0.0  # an event every step, so the stop lands mid-epoch
    try:
        with pytest.raises(TrainingInterrupted) as info:
            t.fit()
    finally:
        T.EVENT_INTERVAL_S = t_events
    assert (info.value.epoch, info.value.step) == (0, 3)
    assert not [p for p in (tmp_path / "b" / "run").iterdir() if p.name.startswith(".tmp-")]

    resumed = _trainer(tmp_path / "b", augment=augment).fit(resume=True)
    assert len(resumed.history) == len(full.history) == 2
    for h1, h2 in zip(full.history, resumed.history, strict=True):
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-4)
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
    w1 = _weights(tmp_path / "a" / "models" / full.card.version / "weights.safetensors")
    w2 = _weights(tmp_path / "b" / "models" / resumed.card.version / "weights.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def test_a_finished_run_cannot_be_resumed_again(tmp_path: Path) -> None:
    result = _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(TrainingError, match=f"already finished as version {result.card.version}"):
        _trainer(tmp_path, epochs=1).fit(resume=True)
