"""Starting a run from a model version (`TrainConfig.base`): its preprocessing, the weights
that fit (the last layer is re-initialised when the labels differ, kept when they are the
same), which layers stay frozen (`freeze`) and the learning rate of the kept ones
(`base_lr_scale`)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

from model.checkpoint import CheckpointError, ModelCard, load_version, read_card
from model.run import TrainingError
from model.transforms import Preprocessing


class BaseVersionError(TrainingError):
    """The base version cannot be fine-tuned from by this run."""


def base_card(models_dir: Path, version: str, arch: str) -> ModelCard:
    try:
        card = read_card(models_dir / version)
    except CheckpointError as exc:
        raise BaseVersionError(f"base version {version}: {exc}") from exc
    if card.arch != arch:
        raise BaseVersionError(f"base version {card.version} is {card.arch}; this run is {arch}")
    return card


def base_preprocessing(card: ModelCard, image_size: int) -> Preprocessing:
    """A fine-tune keeps its base's preprocessing (mean, std, resize policy), at the base's
    image size unless another was asked for."""
    if card.image_size == image_size:
        return card.preprocessing
    return Preprocessing.for_size(image_size, mean=card.mean, std=card.std, resize=card.resize)


def head_names(net: nn.Module) -> set[str]:
    """The state-dict names of the last layer (fc8): the one Linear that maps to classes."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    return {f"{name}.weight", f"{name}.bias"}


def load_base_weights(net: nn.Module, models_dir: Path, card: ModelCard,
                      labels: list[str]) -> dict[str, Any]:  # fmt: skip
    """Every tensor of the base that fits `net`; the last layer only when the base has the
    same labels in the same order (the same count of other labels would be a silent
    mislabelling). Returns the `base` of the run's start event: version, classes, and the
    names of the tensors re-initialised."""
    try:
        src, _ = load_version(models_dir / card.version)
    except CheckpointError as exc:
        raise BaseVersionError(f"base version {card.version}: {exc}") from exc
    own = net.state_dict()
    skip = head_names(net) if list(card.labels) != list(labels) else set()
    fitting = {k: v for k, v in src.state_dict().items()
               if k not in skip and own[k].shape == v.shape}  # fmt: skip
    net.load_state_dict(fitting, strict=False)
    return {"version": card.version, "classes": card.num_classes,
            "labels_differ": bool(skip), "reinitialised": sorted(set(own) - set(fitting))}  # fmt: skip


def frozen(net: nn.Module, freeze: str) -> set[str]:
    """The parameter names `freeze` keeps as they are: none, features (the conv layers) or
    all-but-head (everything but the last layer)."""
    names = {n for n, _ in net.named_parameters()}
    if freeze == "features":
        return {n for n in names if n.startswith("features.")}
    if freeze == "all-but-head":
        return names - head_names(net)
    return set()


def param_groups(net: nn.Module, *, lr: float, freeze: str, base_lr_scale: float,
                 reinitialised: Collection[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The optimizer's parameter groups: frozen parameters are left out (and stop needing
    gradients); new ones learn at `lr`, kept ones at `lr * base_lr_scale`. The first group
    is the one whose rate the progress shows (new layers when there are any)."""
    keep_still = frozen(net, freeze)
    new, kept = [], []
    for n, p in net.named_parameters():
        if n in keep_still:
            p.requires_grad_(False)
        elif n in reinitialised or base_lr_scale == 1.0:
            new.append(p)
        else:
            kept.append(p)
    groups = [{"params": new, "lr": lr}] if new else []
    if kept:
        groups.append({"params": kept, "lr": lr * base_lr_scale})
    return groups


def fine_tune_text(base: dict[str, Any], classes: int) -> str:
    """ "fine-tuning from X; last layer re-initialised, 10 -> 4 classes" (or "all layers
    kept")."""
    text = f"fine-tuning from {base['version']}"
    if base.get("freeze", "none") != "none":
        text += f" (frozen: {base['freeze']})"
    if base["reinitialised"]:
        layers = "last layer" if len(base["reinitialised"]) <= 2 else "layers"
        if base["classes"] == classes:
            return f"{text}; {layers} re-initialised: other labels ({classes} classes)"
        return f"{text}; {layers} re-initialised, {base['classes']} -> {classes} classes"
    return f"{text}; all layers kept ({classes} classes)"
