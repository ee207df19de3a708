"""The paper-style tables of the staged pipeline, built from the stages' prediction files.

Every number comes from ``predictions_*.jsonl`` lines (:class:`Prediction` dicts), scored by
:mod:`pathvlm_lightning.eval.scoring` as everywhere else, with bootstrap intervals from
:mod:`pathvlm_lightning.eval.bootstrap`. ``build_report`` returns a plain, JSON-serialisable dict
(the record kept next to the run); ``report_markdown`` renders it as the tables a reader compares
with the paper's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathvlm_lightning.eval.bootstrap import accuracy_interval, paired_difference, paired_mean_difference
from pathvlm_lightning.eval.counterfactual import report_section, section_markdown
from pathvlm_lightning.eval.faithfulness import faithfulness_markdown, stage_faithfulness
from pathvlm_lightning.eval.faithfulness import per_item as faithfulness_per_item
from pathvlm_lightning.eval.scoring import Prediction, summarize, summarize_by

_LEVEL = 0.95
_FIELDS = {f.name: f for f in dataclasses.fields(Prediction)}
_REQUIRED = [name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING]
_BOOLEAN_FIELDS = ("correct", "format_ok", "truncated")


@dataclass
class StageEval:
    """One stage's evaluation: its in-domain test predictions and, when run, its out-of-domain ones."""

    name: str
    test: list[Prediction]
    ood: list[Prediction] | None = None
    note: str = ""  # one line shown under the stage table, e.g. "SFT on PathMMU train, 3 epochs"
    variants: dict[str, list[Prediction]] = field(default_factory=dict)  # counterfactual name -> test predictions


def load_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Read a ``predictions_*.jsonl`` file; blank lines are skipped, anything else malformed is an error.

    An id seen twice is refused: it would count one question twice in every table.
    """
    path = Path(path)
    predictions: list[Prediction] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            prediction = _parse_line(line, f"{path}:{number}")
            if prediction.id in first_line:
                raise ValueError(
                    f"{path}:{number}: id {prediction.id!r} already appeared on line {first_line[prediction.id]}"
                )
            first_line[prediction.id] = number
            predictions.append(prediction)
    if not predictions:
        raise ValueError(f"{path}: no predictions in this file")
    return predictions


def _parse_line(line: str, where: str) -> Prediction:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in _REQUIRED if name not in row]
    unknown = sorted(set(row) - set(_FIELDS))
    if missing or unknown:
        raise ValueError(f"{where}: not a prediction line (missing fields {missing}, unknown fields {unknown})")
    for name in _BOOLEAN_FIELDS:
        if name in row and not isinstance(row[name], bool):
            raise ValueError(f"{where}: field {name!r} must be true or false, got {row[name]!r}")
    if isinstance(row["output_tokens"], bool) or not isinstance(row["output_tokens"], int):
        raise ValueError(f"{where}: field 'output_tokens' must be an integer, got {row['output_tokens']!r}")
    if not isinstance(row["options"], dict):
        raise ValueError(f"{where}: field 'options' must be an object of letter -> text, got {row['options']!r}")
    return Prediction(**row)


def build_report(
    stages: list[StageEval],
    comparisons: list[tuple[str, str]],
    *,
    num_resamples: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """All tables' numbers as one JSON-serialisable dict (accuracies as fractions in [0, 1]).

    ``comparisons`` lists ``(a, b)`` stage-name pairs, each reported as ``accuracy(a) - accuracy(b)``
    with a paired interval on the test items; a pair naming an absent stage is listed under
    ``skipped_comparisons``, while two stages evaluated on different items is an error. The OOD
    ``mean_accuracy`` is the unweighted mean over modalities, so a large modality does not drown
    the small ones.
    """
    if not stages:
        raise ValueError("build_report: no stages given")
    names = [stage.name for stage in stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"build_report: stage names must be unique, repeated: {repeated}")
    for stage in stages:
        if not stage.test:
            raise ValueError(f"build_report: stage {stage.name!r} has no test predictions")

    bootstrap = dict(num_resamples=num_resamples, level=_LEVEL, seed=seed)
    by_name = {stage.name: stage for stage in stages}
    report: dict[str, Any] = {
        "settings": {"num_resamples": num_resamples, "level": _LEVEL, "seed": seed},
        "stages": {stage.name: _stage_row(stage, bootstrap) for stage in stages},
        "comparisons": [],
        "skipped_comparisons": [],
        "ood": {},
    }
    for a, b in comparisons:
        absent = [name for name in (a, b) if name not in by_name]
        if absent:
            reason = f"stage {', '.join(repr(n) for n in absent)} not evaluated (have {names})"
            report["skipped_comparisons"].append({"a": a, "b": b, "reason": reason})
            continue
        try:
            diff = paired_difference(_correct_by_id(by_name[a]), _correct_by_id(by_name[b]), **bootstrap)
        except ValueError as error:
            raise ValueError(f"build_report: comparison {a!r} vs {b!r}: {error}") from None
        report["comparisons"].append(
            {
                "a": a,
                "b": b,
                "diff": diff.estimate,
                "ci_low": diff.low,
                "ci_high": diff.high,
                "num_items": diff.num_items,
                "a_only": diff.a_only,
                "b_only": diff.b_only,
            }
        )
    for stage in stages:
        if stage.ood:
            report["ood"][stage.name] = _ood_row(stage.ood, bootstrap)
    with_variants = {stage.name: (stage.test, stage.variants) for stage in stages if stage.variants}
    if with_variants:
        report["counterfactual"] = report_section(with_variants, list(comparisons), bootstrap)
    faithful = {stage.name: row for stage in stages if (row := stage_faithfulness(stage.test)) is not None}
    if faithful:
        compared = _faithfulness_comparisons(by_name, faithful, comparisons, bootstrap)
        report["faithfulness"] = {"stages": faithful, "comparisons": compared}
    return report


def _faithfulness_comparisons(by_name, faithful, comparisons, bootstrap) -> list[dict[str, Any]]:
    out = []
    for a, b in comparisons:
        if a not in faithful or b not in faithful:
            continue
        values_a, values_b = faithfulness_per_item(by_name[a].test), faithfulness_per_item(by_name[b].test)
        columns = {}
        for key, column in values_a.items():
            ids = set(column) & set(values_b[key])
            if ids:
                d = paired_mean_difference({i: column[i] for i in ids}, {i: values_b[key][i] for i in ids}, **bootstrap)
                columns[key] = {"diff": d.estimate, "ci_low": d.low, "ci_high": d.high, "num_items": d.num_items}
        out.append({"a": a, "b": b, "columns": columns})
    return out


def _stage_row(stage: StageEval, bootstrap: dict[str, Any]) -> dict[str, Any]:
    summary = summarize(stage.test)
    interval = accuracy_interval([p.correct for p in stage.test], **bootstrap)
    return {
        "count": summary.count,
        "accuracy": summary.accuracy,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "format_compliance": summary.format_compliance,
        "avg_output_tokens": summary.avg_output_tokens,
        "accuracy_by_subset": {k: s.accuracy for k, s in summarize_by(stage.test, "subset").items()},
        "accuracy_by_modality": {k: s.accuracy for k, s in summarize_by(stage.test, "modality").items()},
        "note": stage.note,
    }


def _ood_row(predictions: list[Prediction], bootstrap: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, list[bool]] = {}
    for p in predictions:
        groups.setdefault(p.modality or "-", []).append(p.correct)
    by_modality = {}
    for modality in sorted(groups):
        interval = accuracy_interval(groups[modality], **bootstrap)
        by_modality[modality] = {
            "count": interval.num_items,
            "accuracy": interval.estimate,
            "ci_low": interval.low,
            "ci_high": interval.high,
        }
    mean = sum(row["accuracy"] for row in by_modality.values()) / len(by_modality)
    return {"by_modality": by_modality, "mean_accuracy": mean, "count": len(predictions)}


def _correct_by_id(stage: StageEval) -> dict[str, bool]:
    correct: dict[str, bool] = {}
    for p in stage.test:
        if p.id in correct:
            raise ValueError(f"stage {stage.name!r} has two test predictions for id {p.id!r}")
        correct[p.id] = p.correct
    return correct


# ---- Markdown -------------------------------------------------------------------------------------


def report_markdown(report: dict[str, Any]) -> str:
    """The report's four tables as Markdown, percentages with one decimal (plus the wall times per
    stage and step when the report carries ``timings_seconds``)."""
    stages: dict[str, dict[str, Any]] = report["stages"]
    level = round(100 * report.get("settings", {}).get("level", _LEVEL))
    lines = ["# Evaluation report", ""]

    lines += ["## Accuracy by stage", ""]
    lines += _table(
        ["stage", "n", "accuracy %", f"{level}% CI", "format %", "avg output tokens"],
        (
            [name, str(row["count"]), _pct(row["accuracy"]), _ci(row["ci_low"], row["ci_high"]),
             _pct(row["format_compliance"]), f"{row['avg_output_tokens']:.1f}"]
            for name, row in stages.items()
        ),
    )
    notes = [f"- **{_cell(name)}**: {row['note']}" for name, row in stages.items() if row.get("note")]
    if notes:
        lines += ["", *notes]

    lines += ["", "## Accuracy by question type", ""]
    subsets = sorted({s for row in stages.values() for s in row["accuracy_by_subset"]})
    lines += _table(
        ["stage", *subsets],
        ([name, *(_pct(row["accuracy_by_subset"].get(s)) for s in subsets)] for name, row in stages.items()),
    )

    lines += ["", "## Paired comparisons", ""]
    if report["comparisons"]:
        lines += _table(
            ["a vs b", "difference (points)", f"{level}% CI", "items", "a right only", "b right only"],
            (
                [f"{c['a']} vs {c['b']}", _points(c["diff"]), _ci(c["ci_low"], c["ci_high"], signed=True),
                 str(c["num_items"]), str(c["a_only"]), str(c["b_only"])]
                for c in report["comparisons"]
            ),
        )
    else:
        lines.append("No comparisons could be made.")
    skipped = report.get("skipped_comparisons", [])
    if skipped:
        lines.append("")
        lines += [f"- skipped {_cell(c['a'])} vs {_cell(c['b'])}: {c['reason']}" for c in skipped]

    lines += ["", "## Out-of-domain accuracy by modality", ""]
    ood: dict[str, dict[str, Any]] = report.get("ood", {})
    if ood:
        modalities = sorted({m for row in ood.values() for m in row["by_modality"]})
        lines += _table(
            ["stage", *modalities, "mean"],
            (
                [name, *(_pct(row["by_modality"].get(m, {}).get("accuracy")) for m in modalities),
                 _pct(row["mean_accuracy"])]
                for name, row in ood.items()
            ),
        )
    else:
        lines.append("No out-of-domain predictions.")

    if report.get("counterfactual"):
        lines += ["", *section_markdown(report["counterfactual"], level)]
    if report.get("faithfulness"):
        section = report["faithfulness"]
        lines += ["", *faithfulness_markdown(section["stages"], section["comparisons"], level)]

    timings: dict[str, dict[str, float]] = report.get("timings_seconds", {})  # set by the pipeline runner
    if any(timings.values()):
        lines += ["", "## Wall time (seconds)", ""]
        steps = ("fit", "test", "ood")
        lines += _table(
            ["stage", *steps],
            ([name, *(str(row.get(k, "-")) for k in steps)] for name, row in timings.items() if row),
        )
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _points(fraction: float) -> str:
    return f"{round(100 * fraction, 1) + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0, printed "+0.0"


def _ci(low: float, high: float, signed: bool = False) -> str:
    return f"[{_points(low)}, {_points(high)}]" if signed else f"[{_pct(low)}, {_pct(high)}]"


# ---- files ----------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` under ``out_dir``; each appears whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    _write_atomic(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_atomic(md_path, report_markdown(report))
    return md_path, json_path


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
