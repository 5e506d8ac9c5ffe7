"""McNemar's exact test against values computed by hand."""

from __future__ import annotations

import pytest

from model.stats import mcnemar_exact, paired


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        # n = 12, k = 2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
        (10, 2, 158 / 4096),
        (2, 10, 158 / 4096),  # symmetric
        # n = 6, k = 0: 2 * 1 / 64
        (6, 0, 2 / 64),
        # n = 3, k = 0: 2 / 8 (three wins out of three is not evidence at 0.05)
        (3, 0, 0.25),
        # n = 10, k = 5: the tail is past half, capped at 1
        (5, 5, 1.0),
        # n = 20, k = 4: 2 * (1 + 20 + 190 + 1140 + 4845) / 2^20
        (16, 4, 2 * 6196 / 2**20),
        (0, 0, 1.0),  # nothing tells them apart
    ],
)
def test_mcnemar_exact_matches_hand_computed_values(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_paired_counts_only_the_discordant_images() -> None:
    cand = [True, True, False, True, False, True]
    other = [True, False, False, False, True, True]
    r = paired(cand, other)
    assert (r.n, r.candidate_correct, r.other_correct, r.b, r.c) == (6, 4, 3, 2, 1)
    assert r.candidate_top1 == pytest.approx(4 / 6) and r.other_top1 == pytest.approx(0.5)
    assert r.p_value == pytest.approx(1.0)  # n = 3, k = 1: 2 * (1 + 3) / 8 -> capped
    with pytest.raises(ValueError, match="not the same images"):
        paired([True], [True, False])
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)
