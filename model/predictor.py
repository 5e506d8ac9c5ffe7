"""One prediction pipeline, composed once per model version.

"bytes -> input tensor" (the one decode and eval transform) and "batch -> labelled top-k
rows" (the one model call). The service's decoder threads, the batcher's model call, the
load-time precision probe, `alexnet predict` and `alexnet evaluate` all go through it, so
an image is classified the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import torch
from torch import nn

from model.checkpoint import ModelCard
from model.device import Placement
from model.engine import (
    Classifier,
    EvalResult,
    evaluate,
    for_inference,
    forward_logits,
    predict,
)
from model.images import DecodeLimits, decode_tensor
from model.transforms import EvalTransform

BATCH: Final = 32  # what `classify` runs at once

Row = list[tuple[int, float]]  # (class index, probability), most probable first


class Predictor:
    """`net` as version `card`, placed and in inference mode."""

    def __init__(self, net: nn.Module, card: ModelCard, placement: Placement, *,
                 channels_last: bool = True) -> None:  # fmt: skip
        self.card, self.placement = card, placement
        self.model: Classifier = for_inference(net, card.preprocessing, placement,
                                               channels_last=channels_last,
                                               temperature=card.temperature)  # fmt: skip
        self.transform = EvalTransform(card.preprocessing)

    # ------------------------------------------------------------ bytes -> input tensor

    def decode(self, data: bytes, limits: DecodeLimits) -> torch.Tensor:
        """An uploaded or stored file as the model's input (3, S, S). Raises `ImageError`
        (model/images.py) for what is not a decodable image within `limits`."""
        img = decode_tensor(data, limits=limits, min_side=self.card.preprocessing.min_side)
        return self.transform(img)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded uint8 images (B, 3, H, W) at the resize size as the model's input."""
        return self.transform(images)

    # ------------------------------------------------------------ batch -> top-k rows

    def rows(self, batch: torch.Tensor, top_k: int) -> list[Row]:
        """One row per input: the top `top_k` classes and their softmax probabilities."""
        return list(predict(self.model, batch, top_k).rows())

    def scores(self, data: bytes, limits: DecodeLimits) -> tuple[torch.Tensor, torch.Tensor]:
        """One file through the whole serving path: its (num_classes,) float32
        probabilities (with the version's temperature) and logits (before it)."""
        x = self.decode(data, limits).unsqueeze(0).to(self.placement.device)
        with torch.inference_mode():
            out = forward_logits(self.model, x)[0].cpu()
        return torch.softmax(out, dim=0), out * self.model.temperature

    def top1(self, batch: torch.Tensor) -> torch.Tensor:
        return predict(self.model, batch, 1).indices[:, 0]

    def labelled(self, row: Row) -> list[dict[str, Any]]:
        labels = self.card.labels
        return [{"label": labels[i], "index": i, "probability": p} for i, p in row]

    def classify(
        self, inputs: Sequence[torch.Tensor], top_k: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Labelled rows for any number of inputs, `BATCH` at a time."""
        for start in range(0, len(inputs), BATCH):
            batch = torch.stack(list(inputs[start : start + BATCH]))
            for row in self.rows(batch, top_k):
                yield self.labelled(row)

    # ------------------------------------------------------------ labelled data -> metrics

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 confusion: bool = False, per_item: bool = False) -> EvalResult:  # fmt: skip
        """Loss, top-1, top-5 (and the confusion matrix, and each image's top-1 hit) over
        (uint8 images, labels)."""
        device = self.placement.device
        return evaluate(self.model, ((self.inputs(x.to(device)), y) for x, y in batches),
                        confusion=confusion, per_item=per_item)  # fmt: skip
