"""model/schedules.py: the seed's early stopping and the LR policies, scripted."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.config import TrainConfig
from model.schedules import MIN_LR, EarlyStopping, LRPolicy


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
