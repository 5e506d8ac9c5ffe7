"""The training engine: resume exactness, augmentation boundaries, history, events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from model import trainer as T
from model.checkpoint import list_cards
from model.config import TrainConfig
from model.data import TrainAugment
from model.distributed import DistContext
from model.run import PLOT_FILE, STATE_FILE, Event, TrainingError, TrainingInterrupted
from model.run_state import RunState
from model.schedules import LRPolicy
from model.trainer import Trainer

TINY = {"dataset": "synthetic:120", "image_size": 64, "batch_size": 16, "epochs": 2,
        "precision": "fp32", "device": "cpu", "workers": 0}  # fmt: skip
TINY_LR = TrainConfig.model_fields["lr"].default


def _as_dicts(events: list[dict[str, Any]]) -> Any:
    """A trainer callback that keeps each event as the JSON object it travels as."""
    return lambda ev: events.append(ev.model_dump())


def _trainer(tmp_path: Path, callback: Any = None, **kw: Any) -> Trainer:
    cfg = TrainConfig(**{**TINY, **kw})
    return Trainer(cfg, data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                   run_dir=tmp_path / "run", callback=callback)  # fmt: skip


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


# The second case also turns the recipe options on: a warmup (the stop lands in it),
# label smoothing, gradient clipping and the weights' moving average, whose state must
# travel with the run as exactly as the weights do.
RECIPE = {"warmup_epochs": 1, "label_smoothing": 0.1, "clip_grad_norm": 1.0, "ema_decay": 0.9}


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment+recipe"])
def test_resume_after_an_interrupted_epoch_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, augment: bool
) -> None:
    recipe = RECIPE if augment else {}
    full = _trainer(tmp_path / "a", augment=augment, **recipe).fit()

    holder: dict[str, Trainer] = {}

    def stop_mid_epoch(ev: Event) -> None:
        if ev.type == "step" and ev.epoch == 1 and ev.step >= 3:
            holder["t"].request_stop()

    t = _trainer(tmp_path / "b", stop_mid_epoch, augment=augment, **recipe)
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

    resumed = _trainer(tmp_path / "b", augment=augment, **recipe).fit(resume=True)
    assert len(resumed.history) == len(full.history) == 2
    for h1, h2 in zip(full.history, resumed.history, strict=True):
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-4)
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
    w1 = _weights(tmp_path / "a" / "models" / full.card.version / "weights.safetensors")
    w2 = _weights(tmp_path / "b" / "models" / resumed.card.version / "weights.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def test_with_ema_the_average_is_what_is_validated_and_saved(tmp_path: Path) -> None:
    result = _trainer(tmp_path, epochs=1, ema_decay=0.5).fit()
    saved = _weights(tmp_path / "models" / result.card.version / "weights.safetensors")
    with safe_open(str(tmp_path / "run" / STATE_FILE), framework="pt") as f:
        ema = {k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("ema.")}  # noqa: SIM118
        raw = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
    assert ema.keys() == raw.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], ema[k].contiguous(), rtol=0, atol=0)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # an average, not the weights


def test_label_smoothing_and_clipping_in_one_step() -> None:
    from model.engine import Classifier, sgd_step
    from model.transforms import Preprocessing

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    model = Classifier(net, Preprocessing.for_size(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # the weights stay: the grads are read
    x, y = torch.randn(4, 3, 2, 2) * 50, torch.tensor([0, 1, 2, 0])
    loss, gnorm = sgd_step(net, model, opt, None, x, y, None, label_smoothing=0.2,
                           clip_grad_norm=0.5)  # fmt: skip
    expected = torch.nn.functional.cross_entropy(net(x), y, label_smoothing=0.2).detach()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))  # type: ignore[union-attr]
    assert gnorm > 0.5 and float(clipped) == pytest.approx(
        0.5, rel=1e-4
    )  # reported before clipping


def test_a_finished_run_cannot_be_resumed_again(tmp_path: Path) -> None:
    result = _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(TrainingError, match=f"already finished as version {result.card.version}"):
        _trainer(tmp_path, epochs=1).fit(resume=True)


def _stop_at_step(holder: dict[str, Trainer], step: int) -> Any:
    def callback(ev: Event) -> None:
        if ev.type == "step" and ev.epoch == 1 and ev.step >= step:
            holder["t"].request_stop()

    return callback


def _interrupted(tmp_path: Path, step: int, **kw: Any) -> None:
    """A run stopped in its first epoch after `step` steps, its state saved."""
    holder: dict[str, Trainer] = {}
    t = _trainer(tmp_path, _stop_at_step(holder, step), **kw)
    holder["t"] = t
    t_events = T.EVENT_INTERVAL_S
    T.EVENT_INTERVAL_S = 0.0  # an event every step, so the stop lands mid-epoch
    try:
        with pytest.raises(TrainingInterrupted):
            t.fit()
    finally:
        T.EVENT_INTERVAL_S = t_events


def test_a_state_from_another_world_starts_its_epoch_over(tmp_path: Path) -> None:
    """An elastic restart with another number of processes: the epoch in progress starts
    over from the saved weights, its steps' losses and schedule steps taken back, so the
    run still counts each of its steps once (cosine with a warmup: per-step rates)."""
    recipe = {"scheduler": "cosine", "warmup_epochs": 1}
    _interrupted(tmp_path, 3, **recipe)
    state, tensors = RunState.load(tmp_path / "run")
    assert (state.epoch, state.step) == (0, 3) and len(state.meta["step_losses"]) == 3
    RunState.save(tmp_path / "run", tensors, {**state.meta, "world": 2})  # saved by two

    events: list[dict[str, Any]] = []
    result = _trainer(tmp_path, _as_dicts(events), **recipe).fit(resume=True)
    start = events[0]
    assert start["type"] == "start" and tuple(start["resumed_from"]) == (1, 0)
    spe = start["steps_per_epoch"]
    assert [h["epoch"] for h in result.history] == [1, 2]
    meta = RunState.read(tmp_path / "run").meta
    assert meta["scheduler"]["steps"] == 2 * spe
    assert len(meta["step_losses"]) == 2 * spe
    # The first step of the epoch that started over ran at the warmup's first rate again.
    steps = [e for e in events if e["type"] == "epoch_start"]
    assert steps[0]["lr"] == pytest.approx(TINY_LR * 0.01)


def test_policy_rewind_sets_the_per_step_rate() -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    policy = LRPolicy(opt, "cosine")
    policy.configure(10, 4)
    for _ in range(7):
        opt.step()
        policy.batch_step()
    policy.rewind(2)
    assert policy.steps == 2 and policy.lr == pytest.approx(0.1 * (0.01 + 0.99 * 2 / 4))
    opt.step()
    policy.batch_step()
    assert policy.lr == pytest.approx(0.1 * (0.01 + 0.99 * 3 / 4))


def test_a_version_written_before_the_group_stopped_is_not_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer dies while rank 0 writes the version (its broadcast fails): the restarted
    run finishes with that version, recorded in the run folder, instead of a second."""
    calls = {"n": 0}
    real = DistContext.broadcast_card

    def peer_gone(self: DistContext, card: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("Connection closed by peer")
        return real(self, card)

    monkeypatch.setattr(DistContext, "broadcast_card", peer_gone)
    with pytest.raises(RuntimeError, match="closed by peer"):
        _trainer(tmp_path, epochs=1).fit()
    (written,) = list_cards(tmp_path / "models")
    assert not RunState.read(tmp_path / "run").finished
    result = _trainer(tmp_path, epochs=1).fit(resume=True)
    assert result.card.version == written.version
    assert [c.version for c in list_cards(tmp_path / "models")] == [written.version]
    assert RunState.read(tmp_path / "run").finished_version == written.version
