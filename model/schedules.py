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


class LRPolicy:
    """`plateau`: halve the rate after 3 epochs without a lower validation loss (the seed's
    ReduceLROnPlateau). `step`: divide it by 10 after 2 epochs without a better validation
    top-1, as the paper did ("when the validation error rate stopped improving").
    `cosine`: a per-step cosine decay from `lr` to 0 over the whole run (not in the paper;
    for short runs with a known length, where the others never get to lower the rate)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.kind = kind
        self.total_steps = 1  # set by the trainer once the loader's length is known
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
            self.sched = LambdaLR(optimizer, self._cosine)
        else:
            raise ValueError(f"unknown scheduler {kind!r}; expected plateau, step or cosine")
        self.optimizer = optimizer

    def _cosine(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def batch_step(self) -> None:
        """After every optimizer step (only `cosine` moves here)."""
        if isinstance(self.sched, LambdaLR):
            self.sched.step()

    def step(self, val_loss: float, val_top1: float) -> None:
        """After every validation (only `plateau` and `step` move here)."""
        if isinstance(self.sched, ReduceLROnPlateau):
            self.sched.step(val_loss if self.kind == "plateau" else val_top1)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sched.state_dict())

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.sched.load_state_dict(s)
