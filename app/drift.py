"""Drift signals: how far the labels a version has been answering lately are from the
labels it was trained on, and how often it was not sure.

Per version, the top-1 labels of its last `window` answers (a ring buffer with running
counts, O(1) per answer) against its training label distribution (model.json's
`label_distribution`; uniform for a version without one). The distance is the
Jensen-Shannon divergence in bits, which is 0 for the same distribution and 1 at most:

- it is bounded, so one alert threshold means the same for 10 classes or 1000;
- it is defined when a class has no answers in the window (PSI, the other usual choice,
  takes log(p / q) per class and is infinite for an empty one unless the counts are
  smoothed with a constant that then sets its value);
- it is symmetric.

Sampling noise alone gives a positive value that grows with the number of classes over
the window size: ~0.0016 bits for 10 classes and a window of 1000, but ~0.25 for 1000
classes and 1000 answers. So each version's window also exports that baseline (simulated
once from its reference, `sampling_baseline`), and the alert is on the excess over it
(deploy/prometheus/alerts.yml); a window of 10x the classes or more keeps it small.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MAX_VERSIONS: Final = 4  # versions tracked at once (the served one and recent ones)


def jensen_shannon(p: Sequence[float], q: Sequence[float]) -> float:
    """JS divergence (base 2) of two distributions over the same classes (each is
    normalised here, so counts do)."""
    p = [max(float(a), 0.0) for a in p]
    q = [max(float(b), 0.0) for b in q]
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        return 0.0
    total = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(max(total, 0.0), 1.0)


BASELINE_DRAWS: Final = 20


def sampling_baseline(reference: Sequence[float], size: int, seed: int = 0) -> float:
    """The JSD a full window shows from sampling alone: the mean over `BASELINE_DRAWS`
    simulated windows of `size` answers drawn from `reference` itself (seeded, so the same
    for every server). It grows with the number of classes over the window size."""
    import numpy as np

    q = np.asarray(reference, dtype=np.float64)
    draws = np.random.default_rng(seed).multinomial(size, q / q.sum(), size=BASELINE_DRAWS)
    return sum(jensen_shannon(c.tolist(), reference) for c in draws) / BASELINE_DRAWS


@dataclass
class Window:
    """The last `size` answers of one version: top-1 classes and whether each was unsure."""

    size: int
    reference: list[float]
    ring: list[int] = field(default_factory=list)
    unsure_ring: list[bool] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    unsure: int = 0
    pos: int = 0
    _baseline: float | None = None

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.reference)

    @property
    def baseline(self) -> float:
        """`sampling_baseline` of this window, computed at the first scrape that asks for
        it (milliseconds for 1000 classes: never on an answer's path)."""
        if self._baseline is None:
            self._baseline = sampling_baseline(self.reference, self.size)
        return self._baseline

    def add(self, top1: int, unsure: bool) -> None:
        if len(self.ring) < self.size:
            self.ring.append(top1)
            self.unsure_ring.append(unsure)
        else:
            self.counts[self.ring[self.pos]] -= 1
            self.unsure -= self.unsure_ring[self.pos]
            self.ring[self.pos], self.unsure_ring[self.pos] = top1, unsure
            self.pos = (self.pos + 1) % self.size
        self.counts[top1] += 1
        self.unsure += unsure

    @property
    def n(self) -> int:
        return len(self.ring)

    def divergence(self) -> float:
        return jensen_shannon(self.counts, self.reference) if self.n else 0.0


class DriftTracker(Collector):
    """The windows of the versions that answered lately, and their gauges for Prometheus:
    `alexnet_label_drift_jsd{version}`, `alexnet_uncertain_ratio{version}` and
    `alexnet_drift_window_answers{version}` (how many answers the two stand on)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._versions: OrderedDict[str, Window] = OrderedDict()

    def observe(self, version: str, reference: Sequence[float] | None, num_classes: int,
                top1: int, unsure: bool) -> None:  # fmt: skip
        with self._lock:
            w = self._versions.get(version)
            if w is None:
                ref = (
                    list(reference)
                    if reference and len(reference) == num_classes
                    else [1.0] * num_classes
                )
                w = self._versions[version] = Window(self.window, ref)
                while len(self._versions) > MAX_VERSIONS:
                    self._versions.popitem(last=False)
            else:
                self._versions.move_to_end(version)
            w.add(top1, unsure)

    def divergence(self, version: str) -> float | None:
        with self._lock:
            w = self._versions.get(version)
            return w.divergence() if w is not None else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jsd = GaugeMetricFamily(
            "alexnet_label_drift_jsd",
            "Jensen-Shannon divergence (bits, 0..1) between the top-1 labels of the version's "
            "last ALEXNET_DRIFT_WINDOW answers and its training label distribution",
            labels=["version"])  # fmt: skip
        ratio = GaugeMetricFamily(
            "alexnet_uncertain_ratio",
            "Share of the version's last ALEXNET_DRIFT_WINDOW answers marked uncertain",
            labels=["version"])  # fmt: skip
        base = GaugeMetricFamily(
            "alexnet_label_drift_baseline",
            "The JSD a full window shows from sampling alone (answers drawn from the training "
            "distribution itself): alert on the excess over it", labels=["version"])  # fmt: skip
        n = GaugeMetricFamily("alexnet_drift_window_answers",
                              "Answers in the version's drift window", labels=["version"])  # fmt: skip
        full = GaugeMetricFamily("alexnet_drift_window_full",
                                 "1 once the version's drift window holds ALEXNET_DRIFT_WINDOW "
                                 "answers", labels=["version"])  # fmt: skip
        with self._lock:
            for version, w in self._versions.items():
                jsd.add_metric([version], w.divergence())
                base.add_metric([version], w.baseline)
                ratio.add_metric([version], w.unsure / w.n if w.n else 0.0)
                n.add_metric([version], w.n)
                full.add_metric([version], 1.0 if w.n >= w.size else 0.0)
        yield from (jsd, base, ratio, n, full)
