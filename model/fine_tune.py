"""Starting a run from a model version (`TrainConfig.base`): its preprocessing and the
weights that fit; the last layer is re-initialised when the number of classes differs."""

from __future__ import annotations

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


def load_base_weights(net: nn.Module, models_dir: Path, card: ModelCard) -> dict[str, Any]:
    """Every tensor of the base that fits `net`. Returns the `base` of the run's start
    event: version, classes, and the names of the tensors re-initialised."""
    try:
        src, _ = load_version(models_dir / card.version)
    except CheckpointError as exc:
        raise BaseVersionError(f"base version {card.version}: {exc}") from exc
    own = net.state_dict()
    fitting = {k: v for k, v in src.state_dict().items() if own[k].shape == v.shape}
    net.load_state_dict(fitting, strict=False)
    return {"version": card.version, "classes": card.num_classes,
            "reinitialised": sorted(set(own) - set(fitting))}  # fmt: skip


def fine_tune_text(base: dict[str, Any], classes: int) -> str:
    """ "fine-tuning from X; last layer re-initialised, 10 -> 4 classes" (or "all layers
    kept")."""
    text = f"fine-tuning from {base['version']}"
    if base["reinitialised"]:
        layers = "last layer" if len(base["reinitialised"]) <= 2 else "layers"
        return f"{text}; {layers} re-initialised, {base['classes']} -> {classes} classes"
    return f"{text}; all layers kept ({classes} classes)"
