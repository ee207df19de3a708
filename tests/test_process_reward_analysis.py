"""The experiment's pooled paired interval (experiments/process_reward_analysis.py): hand-worked
estimates, resampling within each seed, and a clear error for unpaired items."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "process_reward_analysis.py"
_SPEC = importlib.util.spec_from_file_location("process_reward_analysis", _PATH)
analysis = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(analysis)


def test_doctests():
    assert doctest.testmod(analysis).failed == 0


def test_seed_means_are_averaged_not_items_pooled():
    # seed 0: 4 items, diff +1 on one -> +0.25; seed 1: 2 items, diff +1 on both -> +1.0; mean 0.625
    a = [{"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}, {"x": 1.0, "y": 1.0}]
    b = [{"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, {"x": 0.0, "y": 0.0}]
    result = analysis.pooled_paired_interval(a, b, num_resamples=2000)
    assert result["estimate"] == pytest.approx(0.625) and result["items"] == 6
    # seed 1 always contributes +1, seed 0 between 0 and +1: the interval lies within [0.5, 1.0]
    assert 0.5 <= result["ci_low"] <= 0.625 <= result["ci_high"] <= 1.0


def test_identical_sides_give_a_zero_width_interval():
    same = [{"a": 1.0, "b": 0.0}, {"c": 0.5}]
    assert analysis.pooled_paired_interval(same, same) == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "items": 3}


def test_unpaired_items_are_an_error():
    with pytest.raises(ValueError, match="seed #0 has different items"):
        analysis.pooled_paired_interval([{"a": 1.0}], [{"b": 1.0}])
