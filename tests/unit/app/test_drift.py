"""The drift gauges (app/drift.py) and the "not sure" flag (app/routes/classify.py)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from app.drift import DriftTracker, Window, jensen_shannon
from app.metrics import Metrics
from app.routes.classify import confidence_threshold, judge


def test_jensen_shannon_on_known_distributions() -> None:
    assert jensen_shannon([1, 2, 3], [2, 4, 6]) == 0.0  # the same, once normalised
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    # half the mass moved: P = (1, 0), Q = (1/2, 1/2); M = (3/4, 1/4)
    # JSD = 1/2 [1 log2(4/3)] + 1/2 [1/2 log2(2/3) + 1/2 log2(2)]
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    assert jensen_shannon([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert jensen_shannon([0.5, 0.5], [1, 0]) == pytest.approx(expected)  # symmetric
    assert jensen_shannon([0, 0], [1, 1]) == 0.0  # nothing observed yet


def test_the_window_keeps_only_the_last_answers() -> None:
    w = Window(4, [0.5, 0.5])
    for label in (0, 0, 0, 0):
        w.add(label, unsure=True)
    assert w.counts == [4, 0] and w.unsure == 4
    for label in (1, 1, 1, 1):  # each pushes out a 0
        w.add(label, unsure=False)
    assert w.counts == [0, 4] and w.n == 4 and w.unsure == 0
    w.add(0, unsure=True)
    assert w.counts == [1, 3] and w.unsure == 1


def test_answers_from_the_training_distribution_stay_near_the_sampling_floor() -> None:
    rng = random.Random(0)
    ref = [0.1] * 10
    tracker = DriftTracker(window=1000)
    for _ in range(5000):
        tracker.observe("v1", ref, 10, rng.randrange(10), unsure=False)
    floor = 9 / (8 * math.log(2) * 1000)  # (classes - 1) / (8 ln 2 window): ~0.0016
    calm = tracker.divergence("v1")
    assert calm is not None and calm < 5 * floor
    # traffic that is all one class is far away: JSD(onehot, uniform over 10)
    for _ in range(1000):
        tracker.observe("v1", ref, 10, 3, unsure=False)
    p, m = 1.0, 0.55
    expected = 0.5 * p * math.log2(p / m) + 0.5 * (0.1 * math.log2(0.1 / 0.55)
                                                 + 9 * 0.1 * math.log2(0.1 / 0.05))  # fmt: skip
    assert tracker.divergence("v1") == pytest.approx(expected)


def test_a_version_without_a_distribution_is_judged_against_uniform() -> None:
    tracker = DriftTracker(window=10)
    for label in range(4):
        tracker.observe("imported", None, 4, label, unsure=False)
    assert tracker.divergence("imported") == pytest.approx(0.0)
    assert tracker.divergence("never-answered") is None


def test_the_gauges_are_exported_per_version_and_old_versions_are_dropped() -> None:
    metrics = Metrics(drift_window=10)
    for i in range(6):
        metrics.answered(f"v{i}", None, 2, 0, 0.4, uncertain=i % 2 == 0)
    text = generate_latest(metrics.registry).decode()
    assert 'alexnet_label_drift_jsd{version="v5"}' in text
    assert 'alexnet_uncertain_ratio{version="v4"} 1.0' in text
    assert 'alexnet_drift_window_answers{version="v5"} 1.0' in text
    assert 'alexnet_label_drift_jsd{version="v0"}' not in text  # only the newest 4 kept
    assert 'alexnet_uncertain_total{version="v0"} 1.0' in text  # counters keep counting
    assert 'alexnet_top1_probability_bucket{le="0.5",version="v1"} 1.0' in text


def _state(min_confidence: float | None) -> SimpleNamespace:
    return SimpleNamespace(settings=SimpleNamespace(min_confidence=min_confidence),
                           metrics=Metrics())  # fmt: skip


def _loaded() -> SimpleNamespace:
    card = SimpleNamespace(version="v1", label_distribution=None, num_classes=3)
    return SimpleNamespace(card=card)


def test_uncertain_only_strictly_below_the_threshold() -> None:
    state, loaded = _state(0.5), _loaded()
    threshold = confidence_threshold(state, None)  # type: ignore[arg-type]
    assert threshold == 0.5
    assert judge(state, loaded, [(0, 0.5), (1, 0.3)], threshold) is False  # type: ignore[arg-type]
    below = math.nextafter(0.5, 0)
    assert judge(state, loaded, [(0, below), (1, 0.3)], threshold) is True  # type: ignore[arg-type]
    assert judge(state, loaded, [(2, 0.9)], None) is False  # type: ignore[arg-type]
    text = generate_latest(state.metrics.registry).decode()
    assert 'alexnet_uncertain_total{version="v1"} 1.0' in text
    assert 'alexnet_answers_total{version="v1"} 3.0' in text


def test_the_request_threshold_overrides_the_setting() -> None:
    assert confidence_threshold(_state(0.5), 0.9) == 0.9  # type: ignore[arg-type]
    assert confidence_threshold(_state(None), None) is None  # type: ignore[arg-type]
    assert confidence_threshold(_state(None), 0.2) == 0.2  # type: ignore[arg-type]


def test_the_sampling_baseline_grows_with_classes_over_window_and_is_exported() -> None:
    from app.drift import sampling_baseline

    small = sampling_baseline([0.1] * 10, 1000)
    floor = 9 / (8 * math.log(2) * 1000)
    assert floor / 2 < small < 2 * floor  # the approximation holds for few classes
    many = sampling_baseline([1.0] * 1000, 1000)
    assert many > 0.1 > sampling_baseline([1.0] * 1000, 10_000)  # window << classes: large
    metrics = Metrics(drift_window=10)
    for _ in range(10):
        metrics.answered("v1", None, 2, 0, 0.9, uncertain=False)
    text = generate_latest(metrics.registry).decode()
    assert 'alexnet_drift_window_full{version="v1"} 1.0' in text
    assert 'alexnet_label_drift_baseline{version="v1"}' in text
