"""The bookkeeping of a run, out of the training loop: the running sums of the epoch in
progress, the best epoch so far and its weights, the time left, and what a run returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import ModelCard, save_version, weights_bytes
from model.config import TrainConfig
from model.data import DatasetBundle
from model.network import build_model
from model.run_state import write_best_weights

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    card: ModelCard
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool


@dataclass
class EpochAcc:
    """Running sums of the epoch in progress (saved, so a resumed epoch reports the
    same numbers as an uninterrupted one)."""

    loss_sum: float = 0.0
    grad_norm_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    step_losses: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Best:
    """The best epoch so far: its history record and weights. While the state file's
    weights are the best epoch's (`in_state`), best.safetensors (228 MB) is not written."""

    record: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    in_state: bool = False

    def improved(self, record: dict[str, Any], net: nn.Module) -> None:
        self.record, self.weights = dict(record), to_cpu(net.state_dict())
        self.in_state = True  # the state written next holds these weights

    def persist(self, run_dir: Path, is_main: bool) -> None:
        """Write best.safetensors before the state file stops holding the best weights."""
        if self.in_state and self.weights is not None and is_main:
            write_best_weights(run_dir, self.weights)
        self.in_state = False


def eta_s(ips: float, *, epoch: int, step: int, steps: int, epochs: int, batch: int,
          world: int, val_seconds: float) -> float:  # fmt: skip
    """Seconds left after `step` (from 1) of `epoch` (from 0), at `ips` images a second and
    `val_seconds` a validation."""
    remaining = (steps - step) + (epochs - epoch - 1) * steps
    validations = epochs - epoch - (0 if step < steps else 1)
    return remaining * batch * world / max(ips, 1e-9) + validations * val_seconds


def to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_best(models_dir: Path, cfg: TrainConfig, bundle: DatasetBundle,
              weights: dict[str, torch.Tensor], best: dict[str, Any], *, epochs_run: int,
              stopped_early: bool, parent: str | None, device: torch.device | None = None,
              workers: int = 0) -> ModelCard:  # fmt: skip
    """The best epoch as a new model version, with its metrics and lineage, its
    calibration, reliability diagram, probes and label distribution (model/extras.py)."""
    from model.extras import make_extras

    metrics = {"val_loss": best["val_loss"], "val_top1": best["val_top1"],
               "val_top5": best["val_top5"], "train_loss": best["train_loss"],
               "best_epoch": best["epoch"], "epochs_run": epochs_run,
               "stopped_early": stopped_early}  # fmt: skip
    net = build_model(cfg.arch, num_classes=len(bundle.labels), init=None)
    net.load_state_dict(weights)
    extras = make_extras(net, bundle, device=device or torch.device("cpu"),
                         batch_size=max(cfg.batch_size, 64), workers=workers)  # fmt: skip
    if extras.calibration is not None:
        c = extras.calibration
        log.info("calibrated: temperature %.3f; on %d %s images ECE %.2f%% -> %.2f%%, NLL "
                 "%.4f -> %.4f", c.temperature, c.n, c.measured_on, 100 * c.ece_before,
                 100 * c.ece_after, c.nll_before, c.nll_after)  # fmt: skip
    return save_version(models_dir, net, arch=cfg.arch, labels=bundle.labels, pre=bundle.pre,
                        metrics=metrics, dataset=bundle.spec, dataset_hash=bundle.hash,
                        holdout_hash=bundle.holdout_hash,
                        train_config={**cfg.model_dump(mode="json"), "split": bundle.split},
                        parent=parent, weights=weights_bytes(net), **extras.kwargs)  # fmt: skip
