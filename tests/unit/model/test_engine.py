"""`engine.evaluate(confusion=True)`: the confusion matrix from the same forward pass."""

from __future__ import annotations

import torch
from torch import nn

from model.engine import evaluate


class _Fixed(nn.Module):
    """Logits given by the input itself: (B, C) -> (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dummy


def test_confusion_counts_true_against_top1_over_batches() -> None:
    logits = torch.eye(3)[[0, 1, 2, 2, 0, 1]] * 5  # predictions 0 1 2 2 0 1
    labels = torch.tensor([0, 1, 1, 2, 2, 1])
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]
    res = evaluate(_Fixed(), batches, confusion=True)
    assert res.confusion is not None
    assert res.confusion.tolist() == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]
    assert int(res.confusion.trace()) == res.top1_correct == 4
    assert int(res.confusion.sum()) == res.count == 6


def test_confusion_is_off_by_default() -> None:
    res = evaluate(_Fixed(), [(torch.eye(3), torch.tensor([0, 1, 2]))])
    assert res.confusion is None and res.top1_correct == 3
    assert res.as_tensor().shape == (4,)  # what shards all-reduce is unchanged
