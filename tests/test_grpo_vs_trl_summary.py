"""benchmarks/grpo_vs_trl.py's figures, from step reports worked out by hand (no model is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _settings import BenchSettings  # noqa: E402
from grpo_vs_trl import render, summarize  # noqa: E402

SETTINGS = BenchSettings("m", "r", total_steps=3, threads=1, num_generations=8, completion_length=256)


def _side(seconds: list[float], growth: float, prompt_tokens: int | None = None) -> dict:
    done = {"peak_rss_mib": 1000.0 + growth, "peak_growth_mib": growth, "process_max_rss_mib": 2000.0,
            "completion_length_mean": 256.0}
    if prompt_tokens is not None:
        done["prompt_tokens"] = prompt_tokens
    return {"ready": {"rss_mib": 1000.0, "parameters": 2e6, "trainable": 1e6}, "seconds": seconds,
            "cpu_seconds": seconds, "done": done}


def test_both_sides_give_ratios_of_the_measured_steps():
    raw = {"ours": _side([9.0, 2.0, 3.0], 100.0, prompt_tokens=367), "trl": _side([50.0, 8.0, 10.0], 400.0)}
    summary = summarize(raw, SETTINGS, warmup=1)
    ratios = summary["ratios_ours_over_trl"]
    assert summary["sides"]["ours"]["seconds_per_step"] == 2.5  # median of 2 and 3; the warm-up's 9 left out
    assert ratios["seconds_per_step"] == pytest.approx(2.5 / 9.0)
    assert ratios["paired_seconds_median"] == pytest.approx((2 / 8 + 3 / 10) / 2)
    assert ratios["peak_growth_mib"] == 0.25
    assert ratios["compute_floor"] == pytest.approx((367 + 8 * 256) / (8 * (367 + 256)))
    assert "ours/TRL" in render("tiny", summary, SETTINGS, warmup=1, steps=2)


def test_our_side_alone_reports_no_ratio():
    summary = summarize({"ours": _side([9.0, 2.0, 3.0], 100.0, prompt_tokens=367)}, SETTINGS, warmup=1)
    assert summary["ratios_ours_over_trl"] is None and set(summary["sides"]) == {"ours"}
    text = render("tiny", summary, SETTINGS, warmup=1, steps=2)
    assert "TRL not run" in text and "ours/TRL" not in text
    assert "s/step (median)                  2.500" in text
    assert "compute floor against G prompt copies" in text and ": 0.48" in text  # 2,415 / 4,984
