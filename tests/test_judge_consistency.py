"""The judge-consistency command against the loopback server, Spearman worked out by hand."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pathvlm_lightning.eval import judge_consistency
from pathvlm_lightning.eval.judge_consistency import average_ranks, main, spearman
from tests.judge_server import JUDGE_KEY_ENV, Scripted, judge_key, judge_server, scores_reply  # noqa: F401

# Rewards each chain gets in repeats 1, 2, 3 (integrity = knowledge, so reward = the value).
SCRIPT = {
    "chain0": [0.1, 0.2, 0.5],
    "chain1": [0.4, 0.3, 0.5],
    "chain2": [0.6, 0.9, 0.7],
    "chain3": [0.9, 0.8, 0.9],
}
# Ranks: run1 [1, 2, 3, 4], run2 [1, 2, 4, 3], run3 [1.5, 1.5, 3, 4].
# rho(1,2) = 1 - 6 * (0 + 0 + 1 + 1) / (4 * 15) = 0.8
# rho(1,3): deviations [-1.5, -.5, .5, 1.5] and [-1, -1, .5, 1.5]: cov 4.5, var 5 and 4.5 -> 4.5 / sqrt(22.5)
# rho(2,3): deviations [-1.5, -.5, 1.5, .5] and [-1, -1, .5, 1.5]: cov 3.5 -> 3.5 / sqrt(22.5)
RHO = {"1-2": 0.8, "1-3": 4.5 / 22.5**0.5, "2-3": 3.5 / 22.5**0.5}


def test_doctests():
    import doctest

    assert doctest.testmod(judge_consistency).failed == 0


def test_spearman_by_hand_and_against_pandas_ranks():
    assert average_ranks([3, 1, 3, 3]) == [3.0, 1.0, 3.0, 3.0]
    assert spearman([0.1, 0.4, 0.6, 0.9], [0.5, 0.5, 0.7, 0.9]) == pytest.approx(RHO["1-3"])
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN: a constant run
    import numpy as np
    import pandas as pd  # installed with `datasets`; its average ranks are an independent check on ties

    x, y = [0.2, 0.2, 0.5, 0.1, 0.9, 0.5], [0.3, 0.1, 0.1, 0.2, 0.8, 0.6]
    expected = np.corrcoef(pd.Series(x).rank(), pd.Series(y).rank())[0, 1]
    assert spearman(x, y) == pytest.approx(expected)


@pytest.fixture
def predictions(tmp_path: Path) -> tuple[Path, Path]:
    """A predictions file without image paths (as the evaluation writes them) and the records."""
    Image.new("RGB", (8, 8), (200, 120, 160)).save(tmp_path / "tile.png")
    options = {"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}
    preds, records = tmp_path / "preds.jsonl", tmp_path / "test.jsonl"
    with preds.open("w") as p, records.open("w") as r:
        for i in range(4):
            row = {"id": f"q{i}", "question": "Size?", "options": options, "answer": "A"}
            p.write(json.dumps({**row, "completion": f"<think>chain{i}</think><answer>A) Large</answer>"}) + "\n")
            r.write(json.dumps({**row, "image": "tile.png"}) + "\n")  # relative to the records file
    return preds, records


def test_command_reports_pairwise_spearman(judge_server, judge_key, predictions, tmp_path, capsys):
    seen: Counter[str] = Counter()

    def respond(body: dict) -> Scripted:
        chain = next(c for c in SCRIPT if c in body["messages"][1]["content"][1]["text"])
        value = SCRIPT[chain][seen[chain]]
        seen[chain] += 1
        return scores_reply(value, value)

    judge_server.responder = respond
    preds, records = predictions
    output = tmp_path / "rho.json"
    report = main([
        "--predictions", str(preds), "--records", str(records), "--repeats", "3", "--output", str(output),
        "--judge.base_url", judge_server.base_url, "--judge.api_key_env", JUDGE_KEY_ENV,
        "--judge.cache_path", str(tmp_path / "ignored.sqlite"), "--master_keys", "0",
    ])
    assert "master_keys" not in report
    assert report["spearman"] == pytest.approx(RHO)
    assert report["mean_spearman"] == pytest.approx(sum(RHO.values()) / 3)  # 0.8288
    assert report["fallbacks"] == [0, 0, 0]
    assert len(judge_server.requests) == 12  # the cache is off: 4 chains x 3 repeats
    assert not (tmp_path / "ignored.sqlite").exists()
    assert json.loads(output.read_text())["spearman"] == pytest.approx(RHO)
    assert "runs 1-2: Spearman rho 0.800" in capsys.readouterr().out


def test_missing_image_is_a_clear_error(predictions, judge_key):
    preds, _ = predictions
    with pytest.raises(ValueError, match=r"preds.jsonl:1: missing \['image'\] \(id 'q0'\)"):
        main(["--predictions", str(preds), "--judge.api_key_env", JUDGE_KEY_ENV])


def test_repeats_must_allow_a_comparison(predictions, judge_key):
    preds, records = predictions
    with pytest.raises(ValueError, match="--repeats must be >= 2 to compare runs, got 1"):
        main(["--predictions", str(preds), "--records", str(records), "--repeats", "1",
              "--judge.api_key_env", JUDGE_KEY_ENV])


def _reasoning(body: dict) -> str:
    text = body["messages"][1]["content"][1]["text"]
    return text.split("<candidate_reasoning>\n", 1)[1].split("\n</candidate_reasoning>", 1)[0]


def test_master_key_battery_measures_how_often_the_judge_is_fooled(
    judge_server, judge_key, predictions, tmp_path, capsys
):
    """A judge that follows the old arithmetic for ":" and "Thought process:" (integrity 0, knowledge
    1: reward 0.5) and gives 0.2 to "Let's solve this step by step." (not above the 0.2 bound), 0
    to the rest; the options pasted back always fail and are left out of the rate."""

    def respond(body: dict) -> Scripted:
        reasoning = _reasoning(body)
        chain = next((c for c in SCRIPT if c in reasoning), None)
        if chain is not None:
            return scores_reply(0.5, 0.5)
        if reasoning == "Let's solve this step by step.":
            return scores_reply(0.2, 0.2)
        if reasoning in (":", "Thought process:"):
            return scores_reply(0.0, 1.0)
        if "A) Large" in reasoning:
            return Scripted(status=400, body={"error": {"message": "bad request"}})  # the options pasted
        return scores_reply(0.0, 0.0)

    judge_server.responder = respond
    preds, records = predictions
    output = tmp_path / "rho.json"
    report = main([
        "--predictions", str(preds), "--records", str(records), "--repeats", "2", "--master_keys", "3",
        "--output", str(output), "--judge.base_url", judge_server.base_url, "--judge.api_key_env", JUDGE_KEY_ENV,
        "--judge.max_retries", "0",
    ])
    keys = report["master_keys"]
    # 3 records x 8 kinds = 24 replies; the 3 options-pasted ones fail: 21 judged, 6 fooled (":" and
    # "Thought process:" x 3).
    assert (keys["records"], keys["replies"], keys["judged"], keys["fallbacks"]) == (3, 24, 21, 3)
    assert keys["fooled_rate"] == pytest.approx(6 / 21)
    assert keys["fooled_rate_by_kind"]["colon"] == keys["fooled_rate_by_kind"]["thought_process"] == 1.0
    assert keys["fooled_rate_by_kind"]["step_by_step"] == 0.0  # 0.2 is not above the bound
    assert keys["fooled_rate_by_kind"]["options_pasted"] != keys["fooled_rate_by_kind"]["options_pasted"]  # NaN
    assert keys["mean_reward"] == pytest.approx((6 * 0.5 + 3 * 0.2) / 21)
    assert json.loads(output.read_text())["master_keys"]["judged"] == 21
    assert "judge fooled (reward > 0.2) by 28.6% of 21 content-free replies" in capsys.readouterr().out
