"""What every written version carries besides its weights: the temperature fitted on its
validation split and measured on its dataset's holdout (model/calibration.py), the
reliability diagram, the parity probes (model/probes.py) and its training label
distribution (the drift gauge's reference). Training and `alexnet calibrate` both make
them here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from model import calibration, probes
from model.checkpoint import (
    RELIABILITY_FILE,
    WEIGHTS_FILE,
    ModelCard,
    load_version,
    save_version,
)
from model.data import (
    DatasetBundle,
    DatasetError,
    ShardSampler,
    batches,
    label_counts,
    load_dataset,
    make_loader,
)
from model.device import Placement
from model.engine import for_inference
from model.transforms import EvalTransform, Preprocessing

log = logging.getLogger(__name__)


@dataclass
class Extras:
    """Keyword arguments for `save_version` (calibration, probes, label_distribution,
    extra_files) and the calibration itself (for printing)."""

    calibration: calibration.Calibration | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def logits_of(net: nn.Module, ds: Dataset[tuple[torch.Tensor, int]] | None, pre: Preprocessing,
              *, device: torch.device, batch_size: int = 64,
              workers: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """fp32 logits and labels of `ds` through the validation path (uint8 images, the eval
    transform on `device`, the model); None for no dataset."""
    if ds is None or len(ds) == 0:  # type: ignore[arg-type]
        return None
    model = for_inference(net, pre, Placement(device, "fp32"), channels_last=False)
    tf = EvalTransform(pre)
    loader = make_loader(ds, ShardSampler(len(ds), rank=0, world=1, shuffle=False),  # type: ignore[arg-type]
                         batch_size=batch_size, workers=workers, pin_memory=False)  # fmt: skip
    return calibration.collect_logits(model, ((tf(x.to(device)), y) for x, y in batches(loader)))


def make_extras(net: nn.Module, bundle: DatasetBundle, *, device: torch.device,
                batch_size: int = 64, workers: int = 0, title: str = "") -> Extras:  # fmt: skip
    """Calibration (fitted on `bundle.val`, measured on `bundle.test`), the reliability
    diagram, the probes (from `bundle.val`, answered with the fitted temperature) and the
    training label distribution. `net` ends on the CPU in fp32."""
    out = Extras()
    temperature = 1.0
    fit = logits_of(net, bundle.val, bundle.pre, device=device, batch_size=batch_size,
                    workers=workers)  # fmt: skip
    if fit is not None:
        held = logits_of(net, bundle.test, bundle.pre, device=device, batch_size=batch_size,
                         workers=workers)  # fmt: skip
        cal = calibration.calibrate(fit, held)
        out.calibration, temperature = cal, cal.temperature
        out.kwargs["calibration"] = cal.card()
        out.kwargs["extra_files"] = {
            RELIABILITY_FILE: calibration.reliability_png(cal, title=title or bundle.spec)
        }
    net = net.cpu().float()
    entries, files = probes.card_entries(
        probes.training_probes(net, bundle.val, bundle.pre, temperature), bundle.labels
    )
    if entries:
        out.kwargs["probes"] = entries
        out.kwargs.setdefault("extra_files", {}).update(files)
    counts = label_counts(bundle.train, len(bundle.labels))
    total: int = 0 if counts is None else int(np.sum(counts))
    if counts is not None and total:
        out.kwargs["label_distribution"] = [round(c / total, 6) for c in counts]
    return out


def calibrate_version(version_dir: Path, spec: str, *, models_dir: Path, data_dir: Path,
                      device: torch.device, batch_size: int = 64, workers: int = 0,
                      holdout_share: float = 0.15) -> tuple[ModelCard, calibration.Calibration]:  # fmt: skip
    """Fit a temperature for the version in `version_dir` on dataset `spec` and write it
    as a new version (same weights, parent = the old one, source "calibration") with the
    calibration, reliability diagram and fresh probes. On the version's own dataset the
    fit uses its validation split (its seed and val_split); on another, a seeded 20%."""
    net, card = load_version(version_dir)
    weights = (version_dir / WEIGHTS_FILE).read_bytes()
    cfg = card.train_config or {}
    # The version's own data (by name, or by content under another name): its own split,
    # so the fit never sees its training images; other data: a seeded 20%.
    own = {"val_split": cfg.get("val_split", 0.2), "seed": cfg.get("seed", 0)}
    bundle = load_dataset(spec, data_dir=data_dir, image_size=card.image_size,
                          pre=card.preprocessing, holdout_share=holdout_share, **own)  # fmt: skip
    same = card.dataset == spec or (card.dataset_hash is not None
                                    and bundle.hash == card.dataset_hash)  # fmt: skip
    if not same and own != {"val_split": 0.2, "seed": 0}:
        bundle = load_dataset(spec, data_dir=data_dir, image_size=card.image_size,
                              val_split=0.2, seed=0, pre=card.preprocessing,
                              holdout_share=holdout_share)  # fmt: skip
    if bundle.labels != card.labels:
        raise DatasetError(
            f"{spec}'s labels ({', '.join(bundle.labels[:4])}...) are not {card.version}'s "
            f"({', '.join(card.labels[:4])}...): calibrate on data with the version's labels"
        )
    extras = make_extras(net, bundle, device=device, batch_size=batch_size, workers=workers,
                         title=f"{card.version} on {spec}")  # fmt: skip
    if extras.calibration is None:
        raise DatasetError(f"{spec} has no validation images to fit a temperature on")
    kwargs = extras.kwargs
    kwargs["calibration"] = {**kwargs["calibration"], "dataset": spec}
    if card.label_distribution is not None:  # the reference stays what it was trained on
        kwargs["label_distribution"] = card.label_distribution
    new = save_version(models_dir, net, arch=card.arch, labels=card.labels,
                       pre=card.preprocessing, metrics=dict(card.metrics),
                       dataset=card.dataset, dataset_hash=card.dataset_hash,
                       holdout_hash=card.holdout_hash, train_config=card.train_config,
                       parent=card.version, source="calibration", weights=weights,
                       **kwargs)  # fmt: skip
    return new, extras.calibration
