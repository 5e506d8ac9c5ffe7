"""The one forward path: `Classifier` (normalise + network, in a precision), `predict()`
(softmax top-k) and `evaluate()` (loss, top-1, top-5). The CLI, validation during
training and the service's batcher all go through these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.device import DTYPES, Placement
from model.transforms import Normalize, Preprocessing


class Classifier(nn.Module):
    """Wraps a network with its input normalisation.

    Input: uint8 (B, 3, S, S) as produced by `EvalTransform`, or floats in [0, 1].
    Output: logits (B, num_classes) in the network's dtype, divided by `temperature` (a
    calibrated version's, model/calibration.py; then float32) when it is not 1.
    """

    def __init__(self, net: nn.Module, pre: Preprocessing, *, channels_last: bool = False,
                 temperature: float = 1.0):  # fmt: skip
        super().__init__()
        self.net = net
        self.norm = Normalize(pre)
        self.pre = pre
        self.channels_last = channels_last
        self.temperature = float(temperature)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.to(self.device, non_blocking=True)).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out: torch.Tensor = self.net(x)
        if self.temperature != 1.0:
            out = out.float() / self.temperature
        return out


def for_inference(
    net: nn.Module,
    pre: Preprocessing,
    placement: Placement,
    *,
    channels_last: bool = True,
    temperature: float = 1.0,
) -> Classifier:
    """Move `net` to the placement's device with weights in its precision (bf16 weights run
    about twice as fast as bf16 autocast for inference on CPUs with AVX-512-BF16)."""
    net = net.to(placement.device, DTYPES[placement.precision]).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = Classifier(net, pre, channels_last=channels_last, temperature=temperature)
    model = model.to(placement.device)
    return model.eval()


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """Mixed precision context for fp32 weights (training); a no-op for `None`/fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class TopK:
    """Softmax top-k for a batch: both (B, k), on the CPU."""

    probabilities: torch.Tensor
    indices: torch.Tensor

    def rows(self) -> Iterator[list[tuple[int, float]]]:
        for probs, idx in zip(self.probabilities.tolist(), self.indices.tolist(), strict=True):
            yield list(zip(idx, probs, strict=True))


def forward_logits(
    model: nn.Module, batch: torch.Tensor, *, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logits as float32 (B, C). The only place a model is called outside training steps."""
    device = next(model.parameters()).device
    with autocast(device, autocast_dtype):
        logits: torch.Tensor = model(batch)
    return logits.float()


DEFAULT_TOP_K = 5


def default_top_k(num_classes: int) -> int:
    """How many classes an answer lists when the caller does not say: 5, or every class
    of a model with fewer (the HTTP API, the CLI and the page agree on this)."""
    return min(DEFAULT_TOP_K, num_classes)


def predict(
    model: nn.Module,
    batch: torch.Tensor,
    top_k: int = 5,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> TopK:
    """Eval mode, inference mode, the model's precision, softmax, top-k."""
    model.eval()
    with torch.inference_mode():
        probs = F.softmax(forward_logits(model, batch, autocast_dtype=autocast_dtype), dim=1)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
    return TopK(values.cpu(), indices.cpu())


@dataclass
class EvalResult:
    """Sums over a dataset (so shards can be all-reduced), and the derived means."""

    loss_sum: float = 0.0
    top1_correct: int = 0
    top5_correct: int = 0
    count: int = 0
    # (C, C) int64 counts, rows = true label, columns = top-1 prediction; only when asked
    # for (`evaluate(confusion=True)`) and not part of `as_tensor()` (never all-reduced).
    confusion: torch.Tensor | None = None
    # Per image, in order: whether its top-1 was right (only with `evaluate(per_item=True)`;
    # the paired promotion test compares two versions image by image).
    correct: list[bool] | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def top1(self) -> float:
        return self.top1_correct / max(self.count, 1)

    @property
    def top5(self) -> float:
        return self.top5_correct / max(self.count, 1)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.loss_sum, self.top1_correct, self.top5_correct, self.count],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> EvalResult:
        loss_sum, c1, c5, n = t.tolist()
        return cls(loss_sum, round(c1), round(c5), round(n))

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_top1": self.top1, "val_top5": self.top5}

    def add_confusion(
        self, labels: torch.Tensor, predicted: torch.Tensor, num_classes: int
    ) -> None:
        """Count (true, predicted) pairs of a batch; both (B,) class indices."""
        pairs = labels.long() * num_classes + predicted.long()
        counts = torch.bincount(pairs, minlength=num_classes * num_classes).cpu()
        counts = counts.view(num_classes, num_classes)
        self.confusion = counts if self.confusion is None else self.confusion + counts


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    confusion: bool = False,
    per_item: bool = False,
) -> EvalResult:
    """Cross-entropy loss, top-1 and top-5 over `batches` of (inputs, labels). Inputs
    must already be what the model takes (see `EvalTransform`). `confusion`: also count
    the confusion matrix (`EvalResult.confusion`) from the same top-1 predictions."""
    model.eval()
    res = EvalResult(correct=[] if per_item else None)
    with torch.inference_mode():
        for inputs, labels in batches:
            logits = forward_logits(model, inputs, autocast_dtype=autocast_dtype)
            labels = labels.to(logits.device)
            res.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (B, k)
            hits = top.eq(labels.unsqueeze(1))
            res.top1_correct += int(hits[:, 0].sum())
            res.top5_correct += int(hits.any(dim=1).sum())
            res.count += labels.numel()
            if confusion:
                res.add_confusion(labels, top[:, 0], logits.shape[1])
            if res.correct is not None:
                res.correct += hits[:, 0].tolist()
    return res


def sgd_step(train_model: nn.Module, model: Classifier, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None, x: torch.Tensor, y: torch.Tensor,
          amp_dtype: torch.dtype | None, *, label_smoothing: float = 0.0,
          clip_grad_norm: float | None = None) -> tuple[float, float]:  # fmt: skip
    """One optimizer step; (loss, gradient norm before clipping). `clip_grad_norm`: the
    gradients' global L2 norm is scaled down to it where larger (after unscaling fp16's)."""
    max_norm = float("inf") if clip_grad_norm is None else clip_grad_norm
    with autocast(x.device, amp_dtype):
        loss = F.cross_entropy(train_model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.unscale_(optimizer)
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()  # type: ignore[no-untyped-call]
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    return float(loss.detach()), float(gnorm)
