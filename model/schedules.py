"""When the learning rate drops and when training stops: the seed's EarlyStopping and the
three LR policies (the article's plateau, the paper's step, cosine). Both save and load
their state with the run (model/run_state.py)."""

from __future__ import annotations

import math
from typing import Any, Final

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from model.config import PLATEAU_PATIENCE, STEP_PATIENCE

MIN_LR: Final = 1e-6


class EarlyStopping:
    """The seed's early stopping: stop after `patience` epochs whose validation loss is not
    better than the best by more than `delta`."""

    def __init__(self, patience: int = 7, delta: float = 0.0) -> None:
        self.patience, self.delta = patience, delta
        self.counter = 0
        self.best_score: float | None = None
        self.early_stop = False

    def __call__(self, val_loss: float) -> bool:
        """Record one epoch; True if it improved on the best."""
        score = -val_loss
        if self.best_score is None:
            self.best_score = score
            return True
        if score < self.best_score + self.delta:
            self.counter += 1
            if self.counter >= self.patience:
                self.early_stop = True
            return False
        self.best_score, self.counter = score, 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "counter": self.counter,
            "best_score": self.best_score,
            "early_stop": self.early_stop,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.counter, self.best_score, self.early_stop = (
            s["counter"],
            s["best_score"],
            s["early_stop"],
        )


WARMUP_START: Final = 0.01  # warmup starts at lr/100 (torchvision's lr_warmup_decay)


class LRPolicy:
    """`plateau`: halve the rate after 3 epochs without a lower validation loss (the seed's
    ReduceLROnPlateau). `step`: divide it by 10 after 2 epochs without a better validation
    top-1, as the paper did ("when the validation error rate stopped improving").
    `cosine`: a per-step cosine decay from `lr` to 0 over the whole run (not in the paper;
    for short runs with a known length, where the others never get to lower the rate).

    With `warmup_steps` (`configure`), the rate first rises linearly per step from
    `WARMUP_START` x lr to lr; plateau and step count validations only from its end, and
    cosine decays over the steps after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.kind = kind
        self.total_steps = 1  # set by the trainer once the loader's length is known
        self.warmup_steps = 0
        self.steps = 0  # optimizer steps taken (saved with the run)
        self.optimizer = optimizer
        self.targets = [float(g["lr"]) for g in optimizer.param_groups]  # each group's lr
        self.sched: ReduceLROnPlateau | LambdaLR
        if kind == "plateau":
            self.sched = ReduceLROnPlateau(
                optimizer, mode="min", factor=0.5, patience=PLATEAU_PATIENCE, min_lr=MIN_LR
            )
        elif kind == "step":
            self.sched = ReduceLROnPlateau(
                optimizer, mode="max", factor=0.1, patience=STEP_PATIENCE, min_lr=MIN_LR
            )
        elif kind == "cosine":
            self.sched = LambdaLR(optimizer, self._factor)
        else:
            raise ValueError(f"unknown scheduler {kind!r}; expected plateau, step or cosine")

    def configure(self, total_steps: int, warmup_steps: int = 0) -> None:
        """The run's length in steps and its warmup; a fresh run starts at the warmup's
        first rate (a resumed one keeps the rate its state restored)."""
        self.total_steps, self.warmup_steps = max(1, total_steps), max(0, warmup_steps)
        if self.steps == 0 and self.warmup_steps:
            self._scale(self._factor(0))

    def _scale(self, factor: float) -> None:
        """Every group's rate at `factor` times its own lr."""
        for g, target in zip(self.optimizer.param_groups, self.targets, strict=True):
            g["lr"] = target * factor

    def _warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return WARMUP_START + (1.0 - WARMUP_START) * step / self.warmup_steps

    def _factor(self, step: int) -> float:
        """The rate at `step` as a fraction of lr: warmup, then (cosine) the decay."""
        w = self._warmup(step)
        if self.kind != "cosine":
            return w
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(max(step - self.warmup_steps, 0), span)
        return w * 0.5 * (1.0 + math.cos(math.pi * done / span))

    def batch_step(self) -> None:
        """After every optimizer step: cosine moves, and so does a warmup."""
        self.steps += 1
        if isinstance(self.sched, LambdaLR):
            self.sched.step()
        elif self.steps <= self.warmup_steps:
            self._scale(self._warmup(self.steps))

    def rewind(self, steps: int) -> None:
        """Set the steps taken to `steps` (an epoch that starts over, counted in the steps
        of the world that resumes it); the per-step rates (warmup, cosine) follow."""
        self.steps = steps
        if isinstance(self.sched, LambdaLR):
            self.sched.last_epoch = steps  # (its base rates are `targets`: the groups' lr)
            self._scale(self._factor(steps))
        elif steps < self.warmup_steps:
            self._scale(self._warmup(steps))

    def step(self, val_loss: float, val_top1: float) -> None:
        """After every validation (only `plateau` and `step` move here, after warmup)."""
        if isinstance(self.sched, ReduceLROnPlateau) and self.steps >= self.warmup_steps:
            self.sched.step(val_loss if self.kind == "plateau" else val_top1)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"sched": dict(self.sched.state_dict()), "steps": self.steps}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if "sched" not in s:  # a state saved before the warmup option: the scheduler's own
            self.sched.load_state_dict(s)
            self.steps = int(s.get("last_epoch", 0)) if self.kind == "cosine" else 0
            return
        self.sched.load_state_dict(s["sched"])
        self.steps = int(s["steps"])
