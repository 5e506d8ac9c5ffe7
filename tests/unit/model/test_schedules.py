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


@pytest.mark.parametrize("kind", ["plateau", "step", "cosine"])
def test_warmup_rises_linearly_per_step_then_hands_over(kind: str) -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.01}, {"params": [b], "lr": 0.001}], lr=0.01)
    pol = LRPolicy(opt, kind)
    pol.configure(total_steps=12, warmup_steps=4)
    lrs = [pol.lr]
    for _ in range(4):
        opt.step()
        pol.batch_step()
        lrs.append(pol.lr)
    # lr/100, then a linear rise per step to lr (each group to its own rate)
    assert lrs == pytest.approx([0.0001, 0.002575, 0.00505, 0.007525, 0.01])
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001)
    if kind == "cosine":  # then the decay over the 8 steps after the warmup
        for _ in range(4):
            opt.step()
            pol.batch_step()
        assert pol.lr == pytest.approx(0.005)
    else:  # validations during warmup do not count towards the scheduler's patience
        fresh = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), kind)
        fresh.configure(total_steps=12, warmup_steps=4)
        for _ in range(3):
            fresh.optimizer.step()
            fresh.batch_step()
            fresh.step(val_loss=1.0, val_top1=0.5)  # stalled, but warming up
        fresh.optimizer.step()
        fresh.batch_step()
        assert fresh.lr == pytest.approx(0.01)
        assert fresh.sched.num_bad_epochs == 0  # type: ignore[union-attr]


def test_a_resumed_warmup_continues_where_it_stopped() -> None:
    def make() -> LRPolicy:
        pol = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), "plateau")
        pol.configure(total_steps=10, warmup_steps=4)
        return pol

    a = make()
    for _ in range(2):
        a.optimizer.step()
        a.batch_step()
    b = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), "plateau")
    b.load_state_dict(a.state_dict())
    b.optimizer.param_groups[0]["lr"] = a.lr  # (the optimizer's groups travel with its state)
    b.configure(total_steps=10, warmup_steps=4)  # a resumed run keeps its rate
    assert b.lr == pytest.approx(a.lr) and b.steps == 2
    for p in (a, b):
        p.optimizer.step()
        p.batch_step()
    assert b.lr == pytest.approx(a.lr) == pytest.approx(0.007525)


def test_a_state_saved_before_warmup_existed_still_loads() -> None:
    a = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), "cosine")
    a.configure(total_steps=8)
    for _ in range(3):
        a.optimizer.step()
        a.batch_step()
    old = a.sched.state_dict()  # the format runs saved until now
    b = LRPolicy(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), "cosine")
    b.load_state_dict(old)
    assert b.steps == 3
