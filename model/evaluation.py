"""Evaluating a version on a named split of a dataset (`alexnet evaluate`): which images a
split holds, one pass of `engine.evaluate` over them, and the report (per class, confusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from model.checkpoint import ModelCard
from model.data import DatasetBundle, DatasetError, ShardSampler, load_dataset, make_loader
from model.device import Placement
from model.engine import EvalResult
from model.predictor import Predictor

Split = Literal["all", "val", "holdout"]
SPLITS: Final = ("all", "val", "holdout")
# At or below this many classes top-5 counts every class: always 100%, so not reported.
TOP5_MIN_CLASSES: Final = 6


@dataclass(frozen=True)
class EvalReport:
    """What one evaluation found; `as_json()` is the `--json` document (less the device)."""

    version: str
    dataset: str
    split: Split
    includes_training_images: bool
    labels: list[str]
    result: EvalResult

    @property
    def confusion(self) -> list[list[int]]:
        """Rows = true label, columns = predicted label, both in `labels` order."""
        n = len(self.labels)
        m = self.result.confusion
        return [[0] * n for _ in range(n)] if m is None else m.tolist()

    @property
    def top5(self) -> float | None:
        return self.result.top5 if len(self.labels) >= TOP5_MIN_CLASSES else None

    def per_class(self) -> list[dict[str, Any]]:
        rows = []
        for i, (label, row) in enumerate(zip(self.labels, self.confusion, strict=True)):
            count, correct = sum(row), row[i]
            rows.append({"label": label, "index": i, "count": count, "correct": correct,
                         "accuracy": correct / count if count else None})  # fmt: skip
        return rows

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "version": self.version,
            "dataset": self.dataset,
            "split": self.split,
            "includes_training_images": self.includes_training_images,
            "count": r.count,
            "loss": r.loss,
            "top1": r.top1,
            "top5": self.top5,
            "labels": self.labels,
            "per_class": self.per_class(),
            "confusion_matrix": self.confusion,
        }


def default_split(bundle: DatasetBundle) -> Split:
    """The dataset's own held-out images when it has them, else the validation split."""
    return "holdout" if bundle.test is not None else "val"


def split_images(bundle: DatasetBundle, split: Split) -> Dataset[tuple[torch.Tensor, int]]:
    """`holdout`: the frozen holdout (cifar10's test split, synthetic's disjoint seed, an
    imagefolder's manifest): never trained on nor used for model selection; `val`:
    the validation split of `bundle`; `all`: train + val."""
    if split == "holdout":
        if bundle.test is None:
            raise DatasetError(
                f"{bundle.spec} has no holdout images (its classes are too small to keep any "
                "out): use --split val (the validation images) or --split all"
            )
        return bundle.test
    if split == "val":
        return bundle.val
    return bundle.val.dataset  # the full dataset both subsets index into


def evaluate_version(
    net: nn.Module,
    card: ModelCard,
    spec: str,
    *,
    split: Split | None,
    data_dir: Path,
    placement: Placement,
    batch_size: int = 128,
    channels_last: bool = False,
    per_item: bool = False,
    holdout_share: float = 0.15,
    split_of: ModelCard | None = None,
) -> EvalReport:
    """Evaluate `net` (the version `card`) on `split` of dataset `spec` (None: its default).

    On the dataset the version was trained on, `val` is exactly its validation split (the
    same seed and val_split); on another dataset it is a seeded 20% of it.
    """
    ref = split_of or card  # whose split (seed, val_split) to take: to judge two versions
    cfg = ref.train_config or {}  # on the very same images (synthetic's holdout is seeded)
    same = ref.dataset == spec
    bundle = load_dataset(
        spec,
        data_dir=data_dir,
        image_size=card.image_size,
        val_split=cfg.get("val_split", 0.2) if same else 0.2,
        seed=cfg.get("seed", 0) if same else 0,
        pre=card.preprocessing,
        holdout_share=holdout_share,
    )
    if bundle.labels != card.labels:
        raise DatasetError(
            f"{spec}'s labels ({', '.join(bundle.labels[:4])}...) are not the model's "
            f"({', '.join(card.labels[:4])}...)"
        )
    split = split or default_split(bundle)
    ds = split_images(bundle, split)
    predictor = Predictor(net, card, placement, channels_last=channels_last)
    loader = make_loader(ds, ShardSampler(len(ds), shuffle=False),  # type: ignore[arg-type]
                         batch_size=batch_size, workers=0, pin_memory=False)  # fmt: skip
    res = predictor.evaluate(loader, confusion=True, per_item=per_item)
    return EvalReport(
        version=card.version,
        dataset=spec,
        split=split,
        includes_training_images=split == "all" and card.dataset == spec,
        labels=list(card.labels),
        result=res,
    )
