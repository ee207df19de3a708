"""Bootstrap intervals checked against distributions worked out by hand.

Resampling n binary outcomes with replacement makes the resampled accuracy exactly
Binomial(n, p_hat) / n, so small examples have intervals we can read off a binomial table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pathvlm_lightning.eval.bootstrap import Interval, PairedDifference, accuracy_interval, paired_difference


def test_all_correct_and_all_wrong_give_degenerate_intervals() -> None:
    assert accuracy_interval([True] * 7) == Interval(estimate=1.0, low=1.0, high=1.0, num_items=7)
    assert accuracy_interval([False] * 3) == Interval(estimate=0.0, low=0.0, high=0.0, num_items=3)


def test_eight_items_half_right_match_the_binomial_quantiles() -> None:
    # Resampled accuracy ~ Binomial(8, 1/2) / 8; P(k) * 256 = 1, 8, 28, 56, 70, 56, 28, 8, 1.
    # CDF(0) = 1/256 = 0.004 < 0.025 < CDF(1) = 9/256 = 0.035  -> 2.5% point is k = 1 -> 0.125
    # CDF(6) = 247/256 = 0.965 < 0.975 < CDF(7) = 255/256       -> 97.5% point is k = 7 -> 0.875
    # (out of 10,000 resamples ~39 fall at k = 0 and ~352 at k <= 1, so the 250th is safely at k = 1)
    result = accuracy_interval([True, False, True, True, False, False, True, False])
    assert result == Interval(estimate=0.5, low=0.125, high=0.875, num_items=8)


def test_level_narrows_the_interval() -> None:
    outcomes = [i % 3 == 0 for i in range(90)]  # 30 of 90 right
    wide = accuracy_interval(outcomes, level=0.99)
    narrow = accuracy_interval(outcomes, level=0.5)
    assert wide.low < narrow.low < 1 / 3 < narrow.high < wide.high


def test_interval_contains_the_estimate() -> None:
    rng = np.random.default_rng(7)
    for n, p in [(5, 0.2), (37, 0.6), (250, 0.9)]:
        outcomes = (rng.random(n) < p).tolist()
        result = accuracy_interval(outcomes, num_resamples=2000)
        assert result.low <= result.estimate <= result.high
        assert result.estimate == sum(outcomes) / n


def test_same_seed_same_interval_other_seed_slightly_different() -> None:
    outcomes = [(i * 7) % 10 < 6 for i in range(300)]  # 180 of 300 right
    first = accuracy_interval(outcomes, seed=3)
    assert accuracy_interval(outcomes, seed=3) == first
    other = accuracy_interval(outcomes, seed=4)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.estimate == first.estimate == 0.6
    assert abs(other.low - first.low) < 0.01 and abs(other.high - first.high) < 0.01


def test_width_matches_the_normal_approximation() -> None:
    # 400 items at accuracy 0.5: the normal interval is 2 * 1.96 * sqrt(0.25 / 400) = 0.098 wide.
    result = accuracy_interval([i % 2 == 0 for i in range(400)])
    expected = 2 * 1.96 * math.sqrt(0.25 / 400)
    assert abs((result.high - result.low) - expected) < 0.2 * expected
    assert abs((result.low + result.high) / 2 - 0.5) < 0.01


def test_many_items_resampled_in_several_chunks() -> None:
    # 1,500 items x 10,000 resamples is drawn in chunks; the interval still matches the normal one.
    outcomes = (np.arange(1500) % 5 < 3).tolist()  # 900 of 1500 = 0.6
    result = accuracy_interval(outcomes)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 1500)  # 0.0248
    assert result.estimate == 0.6
    assert abs((0.6 - result.low) - half_width) < 0.2 * half_width
    assert abs((result.high - 0.6) - half_width) < 0.2 * half_width


def test_paired_difference_hand_example() -> None:
    a = {"q1": True, "q2": True, "q3": False, "q4": True, "q5": False}  # 3/5
    b = {"q1": True, "q2": False, "q3": True, "q4": False, "q5": False}  # 2/5
    result = paired_difference(a, b)
    # a right only: q2, q4; b right only: q3; per-item differences 0, 1, -1, 1, 0
    assert isinstance(result, PairedDifference)
    assert result.estimate == pytest.approx(0.2)
    assert (result.num_items, result.a_only, result.b_only) == (5, 2, 1)
    assert result.low <= 0.2 <= result.high
    assert result.low < 0 < result.high  # 5 items cannot separate the two


def test_paired_difference_interval_on_four_items() -> None:
    # a right only on q2, otherwise equal: per-item differences 0, 1, 0, 0 -> resampled
    # difference ~ Binomial(4, 1/4) / 4 with CDF 0.316, 0.738, 0.949, 0.996, 1:
    # the 2.5% point is k = 0 and the 97.5% point k = 3, so the interval is [0, 0.75].
    a = {"q1": True, "q2": True, "q3": True, "q4": False}
    b = {"q1": True, "q2": False, "q3": True, "q4": False}
    result = paired_difference(a, b)
    assert result == PairedDifference(estimate=0.25, low=0.0, high=0.75, num_items=4, a_only=1, b_only=0)
    swapped = paired_difference(b, a)
    assert (swapped.estimate, swapped.low, swapped.high) == (-0.25, -0.75, 0.0)
    assert (swapped.a_only, swapped.b_only) == (0, 1)


def test_paired_resampling_uses_the_same_items_for_both_sides() -> None:
    # Identical answers: every paired resample gives exactly 0, while two independent intervals
    # around 0.5 would each be ~0.1 wide.
    answers = {f"q{i}": i % 2 == 0 for i in range(400)}
    same = paired_difference(answers, dict(answers))
    assert (same.estimate, same.low, same.high, same.a_only, same.b_only) == (0.0, 0.0, 0.0, 0, 0)
    # One item better on side a only: no resample can make a worse than b.
    better = dict(answers, q1=True)
    one = paired_difference(better, answers)
    assert one.low == 0.0 and 0.0 < one.high <= 3 / 400 and one.estimate == 1 / 400


def test_paired_difference_is_deterministic_for_a_seed() -> None:
    # 1,000 items so the interval ends are not both pinned to the same multiple of 1/n
    a = {f"q{i}": i % 3 != 0 for i in range(1000)}
    b = {f"q{i}": i % 2 == 0 for i in range(1000)}
    first = paired_difference(a, b, seed=5)
    assert paired_difference(a, b, seed=5) == first
    # items are taken in id order, so the order a mapping lists them in does not matter
    assert paired_difference(dict(reversed(list(a.items()))), b, seed=5) == first
    other = paired_difference(a, b, seed=6)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)
    assert abs(other.low - first.low) < 0.01 and abs(other.high - first.high) < 0.01


def test_mismatched_ids_are_refused_with_examples() -> None:
    a = {"q1": True, "q2": False, "only_a_1": True, "only_a_2": False}
    b = {"q1": True, "q2": True, "only_b_1": False}
    with pytest.raises(ValueError, match="same items") as error:
        paired_difference(a, b)
    message = str(error.value)
    assert "2 id(s) are only in a" in message and "'only_a_1'" in message and "'only_a_2'" in message
    assert "1 id(s) are only in b" in message and "'only_b_1'" in message


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_level_outside_zero_one_is_refused(level: float) -> None:
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
        accuracy_interval([True, False], level=level)
    with pytest.raises(ValueError, match="level"):
        paired_difference({"q": True}, {"q": False}, level=level)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no items"):
        accuracy_interval([])
    with pytest.raises(ValueError, match="both sides are empty"):
        paired_difference({}, {})
    with pytest.raises(ValueError, match="must be booleans.*2"):
        accuracy_interval([1, 0, 2])
    with pytest.raises(ValueError, match="must be booleans.*None"):
        paired_difference({"q": True}, {"q": None})
    with pytest.raises(ValueError, match="num_resamples"):
        accuracy_interval([True], num_resamples=0)


def test_results_are_frozen() -> None:
    result = accuracy_interval([True, False])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.low = 0.3  # type: ignore[misc]
