"""Import torchvision's ImageNet AlexNet weights as a model version."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchvision.models import AlexNet_Weights

from model import probes
from model.checkpoint import CheckpointError, ModelCard, check_state_dict, save_version
from model.network import build_model
from model.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger(__name__)

WEIGHTS = AlexNet_Weights.IMAGENET1K_V1
# torchvision's eval recipe for these weights: resize 256, centre crop 224.
IMAGENET_PRE = Preprocessing(
    image_size=224, resize_size=256, resize="center_crop", mean=IMAGENET_MEAN, std=IMAGENET_STD
)


def cached_weights_path() -> Path:
    """Where torchvision keeps the downloaded file (torch hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(WEIGHTS.url).name


def load_torchvision_state(weights_file: Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict from `weights_file`, torch hub's cache, or a download (in that order).
    Files are read with `weights_only=True`: tensors only, no arbitrary objects."""
    if weights_file is None and cached_weights_path().is_file():
        weights_file = cached_weights_path()
    if weights_file is not None:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{weights_file}: no such file") from exc
        except Exception as exc:
            raise CheckpointError(f"{weights_file}: not a torch weights file ({exc})") from exc
    else:
        state = _download()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights_file or WEIGHTS.url}: not a state dict of tensors")
    return state


def _download() -> dict[str, torch.Tensor]:
    """Fetch the weights into torch hub's cache, hash-checked against the digest in the
    file name, and read them as tensors only. (torch.hub's own loader prints a
    "Downloading" line before it knows whether anything can be downloaded.)"""
    dst = cached_weights_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(dst.name)
    try:
        torch.hub.download_url_to_file(
            WEIGHTS.url, str(dst), digest.group(1) if digest else None, progress=False
        )
    except Exception as exc:
        raise CheckpointError(
            f"could not download {WEIGHTS.url} ({type(exc).__name__}: {exc}); place the file "
            f"at {dst}, or import it with `alexnet import-torchvision --weights-file PATH`"
        ) from exc
    log.info("downloaded %s to %s", WEIGHTS.url, dst)
    try:
        state: dict[str, torch.Tensor] = torch.load(dst, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{dst}: not a torch weights file ({exc})") from exc
    return state


def import_torchvision(
    models_dir: Path, *, weights_file: Path | None = None, parent: str | None = None
) -> ModelCard:
    """Convert torchvision's ImageNet AlexNet into a version with the 1000 ImageNet labels
    and torchvision's preprocessing."""
    state = load_torchvision_state(weights_file)
    net = build_model("alexnet", num_classes=1000, init=None)
    source = str(weights_file or WEIGHTS.url)
    check_state_dict(net, state, source=source)
    net.load_state_dict(state, strict=True)
    meta: dict[str, Any] = WEIGHTS.meta
    metrics = {
        f"imagenet_{k.lower().replace('@', '')}": v / 100
        for k, v in meta["_metrics"]["ImageNet-1K"].items()
    }
    labels = list(meta["categories"])
    entries, files = probes.card_entries(
        probes.torchvision_probes(net, WEIGHTS.transforms(), probes.sample_images()), labels
    )
    return save_version(
        models_dir,
        net,
        arch="alexnet",
        labels=labels,
        pre=IMAGENET_PRE,
        metrics=metrics,
        dataset="imagenet-1k",
        source="torchvision",
        parent=parent,
        probes=entries,
        # ImageNet-1k's training set is close to balanced (732 to 1300 images a class)
        label_distribution=[round(1 / len(labels), 8)] * len(labels),
        extra_files=files,
    )
