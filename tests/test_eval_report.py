"""The report tables from two small prediction files written by hand, every number worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathvlm_lightning.eval.report import StageEval, build_report, load_predictions, report_markdown, write_report
from pathvlm_lightning.eval.scoring import Prediction


def _prediction(id: str, subset: str, correct: bool, format_ok: bool = True, tokens: int = 100,
                modality: str = "H&E") -> Prediction:
    return Prediction(
        id=id,
        image=f"images/{id}.png",
        subset=subset,
        modality=modality,
        question=f"What is shown in {id}?",
        options={"A": "tumour", "B": "normal"},
        answer="A",
        completion="<think>...</think><answer>A</answer>" if correct else "<think>...</think><answer>B</answer>",
        predicted_letter="A" if correct else "B",
        correct=correct,
        format_ok=format_ok,
        output_tokens=tokens,
    )


# Alpha: q1 right, q2 wrong, q3 right (bad format), q4 wrong -> 2/4 right, 3/4 formatted, tokens 10..40
ALPHA = [
    _prediction("q1", "EduContent", True, tokens=10),
    _prediction("q2", "EduContent", False, tokens=20),
    _prediction("q3", "PubMed", True, format_ok=False, tokens=30),
    _prediction("q4", "PubMed", False, tokens=40),
]
# Beta: q1, q2, q3 right, q4 wrong -> 3/4; right where Alpha was wrong on q2 only
BETA = [
    _prediction("q1", "EduContent", True),
    _prediction("q2", "EduContent", True),
    _prediction("q3", "PubMed", True),
    _prediction("q4", "PubMed", False),
]
# Beta out of domain: H&E 1 of 2, IHC 1 of 1
BETA_OOD = [
    _prediction("o1", "ood", True, modality="H&E"),
    _prediction("o2", "ood", False, modality="H&E"),
    _prediction("o3", "ood", True, modality="IHC"),
]


def _write(path: Path, predictions: list[Prediction]) -> Path:
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in predictions))
    return path


@pytest.fixture
def report(tmp_path: Path) -> dict:
    alpha = load_predictions(_write(tmp_path / "predictions_alpha.jsonl", ALPHA))
    beta = load_predictions(_write(tmp_path / "predictions_beta.jsonl", BETA))
    beta_ood = load_predictions(_write(tmp_path / "predictions_beta_ood.jsonl", BETA_OOD))
    stages = [StageEval("Alpha", alpha, note="SFT"), StageEval("Beta", beta, ood=beta_ood)]
    return build_report(stages, [("Beta", "Alpha"), ("Gamma", "Alpha")])


def test_load_predictions_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", ALPHA)
    path.write_text(path.read_text() + "\n")  # a trailing blank line is harmless
    assert load_predictions(path) == ALPHA


def test_stage_rows(report: dict) -> None:
    alpha, beta = report["stages"]["Alpha"], report["stages"]["Beta"]
    assert list(report["stages"]) == ["Alpha", "Beta"]
    assert (alpha["count"], alpha["accuracy"], alpha["format_compliance"], alpha["avg_output_tokens"]) == (
        4, 0.5, 0.75, 25.0)
    assert (beta["count"], beta["accuracy"], beta["format_compliance"], beta["avg_output_tokens"]) == (
        4, 0.75, 1.0, 100.0)
    # Alpha: Binomial(4, 1/2) puts 1/16 = 6% on each of 0 and 4 right -> interval [0, 1].
    assert (alpha["ci_low"], alpha["ci_high"]) == (0.0, 1.0)
    # Beta: Binomial(4, 3/4): P(0) = 0.004, P(<=1) = 0.051, P(4) = 0.316 -> interval [0.25, 1].
    assert (beta["ci_low"], beta["ci_high"]) == (0.25, 1.0)
    assert alpha["accuracy_by_subset"] == {"EduContent": 0.5, "PubMed": 0.5}
    assert beta["accuracy_by_subset"] == {"EduContent": 1.0, "PubMed": 0.5}
    assert beta["accuracy_by_modality"] == {"H&E": 0.75}
    assert alpha["note"] == "SFT"


def test_comparisons_and_skipped(report: dict) -> None:
    # per-item Beta - Alpha: 0, 1, 0, 0 -> resampled ~ Binomial(4, 1/4) / 4 -> [0, 0.75]
    assert report["comparisons"] == [
        {"a": "Beta", "b": "Alpha", "diff": 0.25, "ci_low": 0.0, "ci_high": 0.75,
         "num_items": 4, "a_only": 1, "b_only": 0}
    ]
    assert len(report["skipped_comparisons"]) == 1
    skipped = report["skipped_comparisons"][0]
    assert (skipped["a"], skipped["b"]) == ("Gamma", "Alpha") and "'Gamma'" in skipped["reason"]


def test_ood_rows(report: dict) -> None:
    assert list(report["ood"]) == ["Beta"]  # Alpha has no OOD predictions
    beta = report["ood"]["Beta"]
    assert beta["by_modality"]["H&E"] == {"count": 2, "accuracy": 0.5, "ci_low": 0.0, "ci_high": 1.0}
    assert beta["by_modality"]["IHC"] == {"count": 1, "accuracy": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert beta["mean_accuracy"] == 0.75  # unweighted over modalities (2/3 if weighted by items)
    assert beta["count"] == 3


def test_markdown_tables(report: dict) -> None:
    md = report_markdown(report)
    for section in ("## Accuracy by stage", "## Accuracy by question type", "## Paired comparisons",
                    "## Out-of-domain accuracy by modality"):
        assert section in md
    assert "| stage | n | accuracy % | 95% CI | format % | avg output tokens |" in md
    assert "| Alpha | 4 | 50.0 | [0.0, 100.0] | 75.0 | 25.0 |" in md
    assert "| Beta | 4 | 75.0 | [25.0, 100.0] | 100.0 | 100.0 |" in md
    assert "- **Alpha**: SFT" in md
    assert "| stage | EduContent | PubMed |" in md
    assert "| Alpha | 50.0 | 50.0 |" in md and "| Beta | 100.0 | 50.0 |" in md
    assert "| a vs b | difference (points) | 95% CI | items | a right only | b right only |" in md
    assert "| Beta vs Alpha | +25.0 | [+0.0, +75.0] | 4 | 1 | 0 |" in md
    assert "skipped Gamma vs Alpha" in md
    assert "| stage | H&E | IHC | mean |" in md
    assert "| Beta | 50.0 | 100.0 | 75.0 |" in md
    # sections in the order of the paper's tables
    order = [md.index(s) for s in ("by stage", "by question type", "Paired", "Out-of-domain")]
    assert order == sorted(order)


def test_markdown_without_comparisons_or_ood() -> None:
    report = build_report([StageEval("Only", list(ALPHA))], [], num_resamples=200)
    md = report_markdown(report)
    assert "No comparisons could be made." in md and "No out-of-domain predictions." in md
    assert "| Only | 4 | 50.0 |" in md


def test_write_report_round_trips(report: dict, tmp_path: Path) -> None:
    md_path, json_path = write_report(report, tmp_path / "out")
    assert (md_path.name, json_path.name) == ("report.md", "report.json")
    assert json.loads(json_path.read_text()) == report
    assert md_path.read_text() == report_markdown(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]  # no leftovers


def test_report_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    stages = [StageEval("Alpha", list(ALPHA)), StageEval("Beta", list(BETA))]
    first = build_report(stages, [("Beta", "Alpha")], seed=3)
    assert build_report(stages, [("Beta", "Alpha")], seed=3) == first
    assert first["settings"] == {"num_resamples": 10000, "level": 0.95, "seed": 3}


def test_comparison_on_different_items_is_an_error() -> None:
    beta_other = [*BETA[:3], _prediction("q9", "PubMed", True)]
    stages = [StageEval("Alpha", list(ALPHA)), StageEval("Beta", beta_other)]
    with pytest.raises(ValueError, match=r"comparison 'Beta' vs 'Alpha'.*'q9'.*'q4'"):
        build_report(stages, [("Beta", "Alpha")])


def test_bad_stages_are_refused() -> None:
    with pytest.raises(ValueError, match="unique.*'Alpha'"):
        build_report([StageEval("Alpha", list(ALPHA)), StageEval("Alpha", list(BETA))], [])
    with pytest.raises(ValueError, match="'Empty' has no test predictions"):
        build_report([StageEval("Empty", [])], [])
    with pytest.raises(ValueError, match="no stages"):
        build_report([], [])


def _second_row(**changes: object) -> str:
    return json.dumps({**ALPHA[1].to_json(), **changes})


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"id": "q2", "correct": tru', r"p\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"p\.jsonl:2: expected a JSON object, got list"),
        ('{"id": "q2"}', r"p\.jsonl:2: not a prediction line \(missing fields \['image'"),
        (_second_row(correct=1), r"p\.jsonl:2: field 'correct' must be true or false, got 1"),
        (_second_row(output_tokens="12"), r"p\.jsonl:2: field 'output_tokens' must be an integer"),
        (_second_row(id="q1"), r"p\.jsonl:2: id 'q1' already appeared on line 1"),
        (_second_row(score=0.5), r"p\.jsonl:2: not a prediction line \(missing fields \[\], unknown fields \['score'\]"),
    ],
    ids=["json", "array", "missing", "correct", "tokens", "duplicate", "unknown"],
)
def test_bad_line_names_file_and_line(tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ALPHA[0].to_json()) + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=message):
        load_predictions(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no predictions"):
        load_predictions(path)
