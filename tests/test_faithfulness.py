"""Chain faithfulness against the tile's drawn features (issue 20, item 2), worked out by hand."""

from __future__ import annotations

import json

import pytest

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import EMBEDDED_VERBOSE_RATE, generate_dataset
from pathvlm_lightning.eval import faithfulness
from pathvlm_lightning.eval.faithfulness import ChainScore, feature_claims, score_chain, tile_truth
from pathvlm_lightning.eval.report import StageEval, build_report, report_markdown
from pathvlm_lightning.eval.scoring import score_prediction

SPEC = {"stain": "IHC, partly DAB-positive", "size_grade": 1, "density_grade": 3, "arrangement": "sheet"}
TRUTH = {"stain": "IHC, partly DAB-positive", "size": 1, "density": 3}


def test_doctests():
    import doctest

    assert doctest.testmod(faithfulness).failed == 0


@pytest.mark.parametrize(
    ("completion", "subset", "expected"),
    [
        # medium (true), not enlarged (true: 1 is in {0, 1}), sparse (false), not crowded (false)
        ("<think>The nuclei are medium, so not enlarged, and sparse, so not crowded.</think>", "grade",
         ChainScore(4, 2, True)),
        # one true size claim; the grade needs density too
        ("<think>The nuclei are modest ovals about 7 pixels across.</think>", "grade", ChainScore(1, 1, False)),
        # pale blue background (true: an IHC stain), "most nuclei are brown" (false: partly)
        ("<think>The background is pale blue and most nuclei are brown.</think>", "stain", ChainScore(2, 1, True)),
        # rules, the question, the options and the conclusion make no claim
        ("<think>The question asks about crowding; the options are sparse or dense. Density is graded by how "
         "many nuclei fill the tile, so the answer is very dense.</think>", "nuclear_density", ChainScore(0, 0, False)),
        # a chain cut off before </think> is still read
        ("<think>About thirty nuclei crowd the tile", "nuclear_density", ChainScore(1, 1, True)),
    ],
)
def test_claims_checked_against_the_tile(completion, subset, expected):
    assert score_chain(completion, TRUTH, subset) == expected


def test_very_large_is_not_also_read_as_large():
    assert [sorted(c.allowed) for c in feature_claims("The nuclei are very large ovals.")] == [[3]]


def test_every_embedded_demonstration_is_faithful(tmp_path):
    path = generate_dataset(tmp_path, 120, seed=0, option_order="fixed", verbose_rate=EMBEDDED_VERBOSE_RATE)
    for row in map(json.loads, path.read_text().splitlines()):
        record = VQARecord(**row)
        score = score_chain(record.demonstration, tile_truth(row["extra"]["spec"]), record.subset)
        assert score.claims >= 1 and score.true_claims == score.claims and score.names_needed, record.demonstration


def _prediction(i: int, subset: str, chain: str, spec: dict | None = SPEC):
    record = VQARecord(id=f"q{i}", image="x.png", question="?", options={"A": "a", "B": "b"}, answer="A",
                       subset=subset, extra={"spec": spec} if spec else {})
    return score_prediction(record, f"<think>{chain}</think><answer>A) a</answer>", 10)


def test_predictions_carry_the_spec_and_the_report_scores_each_stage():
    alpha = [
        _prediction(0, "grade", "The nuclei are medium, so not enlarged."),  # 2 claims, 2 true, lacks density
        _prediction(1, "nuclear_density", "Only a handful of nuclei lie far apart."),  # 1 claim, false
    ]
    beta = [
        _prediction(0, "grade", "The nuclei are medium, so not enlarged, and very dense, so crowded."),  # 4/4, both
        _prediction(1, "nuclear_density", "About thirty nuclei crowd the tile."),  # 1/1
    ]
    assert alpha[0].spec == SPEC and json.loads(json.dumps(alpha[0].to_json()))["spec"] == SPEC
    report = build_report([StageEval("alpha", alpha), StageEval("beta", beta)], [("beta", "alpha")], num_resamples=200)
    rows = report["faithfulness"]["stages"]
    assert rows["alpha"]["claims_per_chain"] == 1.5 and rows["alpha"]["true_claim_share"] == pytest.approx(2 / 3)
    assert rows["alpha"]["names_needed_share"] == 0.5
    assert (rows["beta"]["claims_per_chain"], rows["beta"]["true_claim_share"], rows["beta"]["names_needed_share"]) == (2.5, 1.0, 1.0)
    assert rows["beta"]["by_subset"]["grade"] == {"chains": 1, "claims_per_chain": 4.0, "true_claim_share": 1.0,
                                                  "names_needed_share": 1.0}
    (comparison,) = report["faithfulness"]["comparisons"]
    assert comparison["columns"]["claims_per_chain"]["diff"] == pytest.approx(1.0)  # (2 + 0) / 2 more claims
    assert comparison["columns"]["names_needed_share"]["diff"] == pytest.approx(0.5)
    # per chain, beta's true shares (1, 1) against alpha's (2/2, 0/1): (0 + 1) / 2
    assert comparison["columns"]["true_share_per_chain"]["diff"] == pytest.approx(0.5)
    text = report_markdown(report)
    assert "## Chain faithfulness (tile truth known)" in text and "| beta | 2.5 | 100.0 | 100.0 |" in text


def test_data_without_known_features_has_no_faithfulness_columns():
    preds = [_prediction(i, "PubMed", "The nuclei are large.", spec=None) for i in range(2)]
    assert preds[0].spec is None
    report = build_report([StageEval("alpha", preds)], [], num_resamples=100)
    assert "faithfulness" not in report and "faithfulness" not in report_markdown(report).lower()
