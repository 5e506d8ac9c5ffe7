"""Temperature scaling and the calibration error (model/calibration.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import calibration
from model.calibration import calibrate, ece, fit_temperature, nll, reliability


def _sampled(true_t: float, n: int = 20_000, classes: int = 10, seed: int = 0):
    """Labels drawn from softmax(z / true_t): a model whose logits are `true_t` times too
    large. Fitting must find T close to `true_t`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 3
    labels = torch.multinomial(F.softmax(z / true_t, dim=1), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fitting_recovers_a_known_temperature(true_t: float) -> None:
    z, labels = _sampled(true_t)
    t = fit_temperature(z, labels)
    assert t == pytest.approx(true_t, rel=0.06)
    # and it is the minimum: a little either way is worse
    assert nll(z, labels, t) <= min(nll(z, labels, t * 0.9), nll(z, labels, t * 1.1))


def test_fitting_lowers_the_nll_and_the_ece_of_an_over_confident_model() -> None:
    z, labels = _sampled(2.0)
    cal = calibrate((z[:10_000], labels[:10_000]), (z[10_000:], labels[10_000:]))
    assert cal.measured_on == "holdout" and cal.n == 10_000 and cal.fitted_n == 10_000
    assert cal.nll_after < cal.nll_before and cal.ece_after < cal.ece_before / 3
    card = cal.card()
    assert set(card) >= {"temperature", "ece_before", "ece_after", "nll_before", "nll_after",
                         "bins", "n"} and card["bins"] == 15  # fmt: skip


def test_ece_of_a_hand_computed_case() -> None:
    # 4 images, 2 classes, 15 bins of width 1/15 (values kept off the bin edges):
    #   p = 0.9 right, 0.9 wrong -> bin 13 (13/15, 14/15]: confidence 0.9, accuracy 0.5
    #   p = 0.62 right           -> bin 9 (9/15, 10/15]:   confidence 0.62, accuracy 1
    #   p = 0.55 wrong           -> bin 8 (8/15, 9/15]:    confidence 0.55, accuracy 0
    # ECE = 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.62| + 1/4 * |0 - 0.55| = 0.2 + 0.095 + 0.1375
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.62, 0.38], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 0, 0])
    rel = reliability(probs, labels)
    assert [i for i, c in enumerate(rel.counts) if c] == [8, 9, 13] and rel.counts[13] == 2
    assert rel.confidence[13] == pytest.approx(0.9) and rel.accuracy[13] == 0.5
    assert ece(probs, labels) == pytest.approx(0.4325)


def test_a_probability_on_a_bin_edge_falls_in_the_lower_bin() -> None:
    # 4 bins: 0.5 and 0.75 are exact in binary, so they sit on edges exactly
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    rel = reliability(probs, torch.tensor([0, 0, 0]), bins=4)
    assert rel.counts == [0, 1, 1, 1]


def test_a_perfectly_calibrated_model_has_an_ece_near_zero() -> None:
    z, labels = _sampled(1.0, n=50_000)
    assert ece(F.softmax(z, dim=1), labels) < 0.01


def test_temperature_never_changes_the_ranking_and_is_clamped() -> None:
    z, _ = _sampled(1.0, n=500)
    for t in (0.3, 3.0):
        assert torch.equal((z / t).argsort(dim=1), z.argsort(dim=1))
    # logits that carry no information: the best T is huge, and is clamped
    flat = torch.zeros(100, 10)
    flat[:, 0] = torch.randn(100) * 1e-3
    assert fit_temperature(flat, torch.randint(0, 10, (100,))) <= calibration.T_MAX
    assert fit_temperature(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)) == 1.0


def test_without_a_holdout_it_is_measured_on_the_fit_split_and_says_so() -> None:
    z, labels = _sampled(1.5, n=2000)
    cal = calibrate((z, labels), None)
    assert cal.measured_on == "val" and cal.n == 2000
    assert math.isfinite(cal.nll_after)


def test_the_reliability_diagram_is_a_png() -> None:
    z, labels = _sampled(2.0, n=2000)
    png = calibration.reliability_png(calibrate((z, labels), (z, labels)), title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_temperature_that_does_not_hold_on_unseen_data_is_not_kept() -> None:
    # a validation split whose halves disagree: every even image right, a third of the odd
    # ones confidently wrong. Fitted on the even half T sharpens (and the odd half pays),
    # fitted on the odd half it softens (and the even half pays): no T holds on unseen data.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(60, 4, generator=g)
    z[torch.arange(60), z.argmax(dim=1)] += 2.0  # a clear top-1 everywhere
    labels = z.argmax(dim=1)
    for i in range(1, 60, 6):
        labels[i] = (labels[i] + 1) % 4
    t, note = calibration.checked_temperature(z, labels)
    assert fit_temperature(z, labels) != pytest.approx(1.0, abs=0.05)  # an unchecked fit moves
    assert t == 1.0 and note is not None and "kept T = 1" in note
    cal = calibrate((z, labels), None)
    assert cal.temperature == 1.0 and cal.card()["note"] == note
    # too few images: nothing is fitted
    assert calibration.checked_temperature(z[:10], labels[:10])[0] == 1.0
    # a model that is really over-confident keeps its fitted temperature
    z2, labels2 = _sampled(2.0, n=4000)
    t2, note2 = calibration.checked_temperature(z2, labels2)
    assert note2 is None and t2 == pytest.approx(2.0, rel=0.1)
