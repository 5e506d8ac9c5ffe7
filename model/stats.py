"""Small statistics for judging models: McNemar's exact test on paired per-image results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedResult:
    """Two models judged on the same images. `b`: images only the candidate got right;
    `c`: images only the other got right (the discordant pairs McNemar's test counts)."""

    n: int
    candidate_correct: int
    other_correct: int
    b: int
    c: int

    @property
    def candidate_top1(self) -> float:
        return self.candidate_correct / self.n if self.n else 0.0

    @property
    def other_top1(self) -> float:
        return self.other_correct / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.b, self.c)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under "both models are as good", each of the
    n = b + c discordant images is a fair coin, so p = P(a Binomial(n, 1/2) is at least as
    far from n/2 as what was seen) = min(1, 2 * sum_{i <= min(b, c)} C(n, i) / 2^n).
    No discordant image: p = 1 (nothing tells them apart)."""
    if b < 0 or c < 0:
        raise ValueError("counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(2 * tail / 2**n))


def paired(candidate: Sequence[bool], other: Sequence[bool]) -> PairedResult:
    """Per-image top-1 hits of two models on the same images, in the same order."""
    if len(candidate) != len(other):
        raise ValueError(f"{len(candidate)} and {len(other)} results: not the same images")
    b = sum(1 for x, y in zip(candidate, other, strict=True) if x and not y)
    c = sum(1 for x, y in zip(candidate, other, strict=True) if y and not x)
    return PairedResult(len(candidate), sum(candidate), sum(other), b, c)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float | None, float | None]:
    """The Wilson score interval for k successes in n trials (95% by default): unlike the
    normal approximation it stays inside [0, 1] and is honest for small n and rates near 0
    or 1. (None, None) when n is 0."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(results: Sequence[PairedResult]) -> PairedResult:
    """Several paired results on disjoint image sets as one (their counts summed)."""
    return PairedResult(sum(r.n for r in results), sum(r.candidate_correct for r in results),
                        sum(r.other_correct for r in results), sum(r.b for r in results),
                        sum(r.c for r in results))  # fmt: skip
