"""Scores of the counterfactual evaluation (``data/counterfactual.py``), per stage and between stages.

Per stage: the accuracy and format compliance of each variant, and two derived columns:

- **image reliance** = accuracy - swapped-image accuracy, on the items both were scored on. Near 0:
  the answers do not depend on which image is shown.
- **option consistency** = the share of questions whose chosen option *text* is the same with the
  options shuffled as in the original order (no answer in either counts as inconsistent).

Between stages (``a`` vs ``b``), each column's difference with a paired bootstrap interval on the
items both stages were scored on (for image reliance the per-item value is correct - correct with a
swapped image, in {-1, 0, 1}).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pathvlm_lightning.data.counterfactual import COUNTERFACTUALS
from pathvlm_lightning.eval.bootstrap import paired_mean_difference
from pathvlm_lightning.eval.scoring import Prediction

#: The per-stage columns, in table order: (key, header).
COLUMNS = (
    ("accuracy", "accuracy"),
    ("blank_accuracy", "blank image"),
    ("swapped_accuracy", "swapped image"),
    ("no_image_accuracy", "no image"),
    ("shuffled_accuracy", "shuffled options"),
    ("image_reliance", "image reliance"),
    ("option_consistency", "option consistency"),
)


def variant_path(path: str | os.PathLike, name: str) -> Path:
    """Where a counterfactual's predictions go, beside the original's.

    >>> str(variant_path("runs/alpha/predictions_test.jsonl", "blank"))
    'runs/alpha/predictions_test.blank.jsonl'
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.{name}{path.suffix}")


def chosen_text(prediction: Prediction) -> str | None:
    """The text of the option the prediction's letter names (None without a valid letter)."""
    letter = prediction.predicted_letter
    return prediction.options.get(letter) if letter else None


def per_item(original: list[Prediction], variants: dict[str, list[Prediction]]) -> dict[str, dict[str, float]]:
    """Column -> item id -> value (0/1, or -1/0/1 for image reliance), for the columns the variants allow.

    ``accuracy`` is the original's on the items asked under some variant (all of them without a
    ``counterfactual_items`` sample), so each row compares like with like."""
    by_id = {p.id: p for p in original}
    asked = {p.id for preds in variants.values() for p in preds if p.id in by_id} or set(by_id)
    values: dict[str, dict[str, float]] = {"accuracy": {i: float(by_id[i].correct) for i in sorted(asked)}}
    for name in COUNTERFACTUALS:
        if name not in variants:
            continue
        seen = {p.id: p for p in variants[name] if p.id in by_id}
        values[f"{name}_accuracy"] = {i: float(p.correct) for i, p in seen.items()}
        if name == "swapped":
            values["image_reliance"] = {i: float(by_id[i].correct) - float(p.correct) for i, p in seen.items()}
        if name == "shuffled":
            values["option_consistency"] = {
                i: float(chosen_text(p) is not None and chosen_text(p) == chosen_text(by_id[i])) for i, p in seen.items()
            }
    return values


def stage_row(original: list[Prediction], variants: dict[str, list[Prediction]]) -> dict[str, Any]:
    """One stage's counterfactual columns (fractions), each variant's format compliance and counts.

    >>> def pred(i, correct, letter="A", options=None):
    ...     return Prediction(id=i, image="x", subset="s", modality="m", question="?", options=options or
    ...                       {"A": "a", "B": "b"}, answer="A", completion="", predicted_letter=letter,
    ...                       correct=correct, format_ok=True, output_tokens=1)
    >>> orig = [pred("1", True), pred("2", True)]
    >>> row = stage_row(orig, {"swapped": [pred("1", True), pred("2", False)],
    ...                        "shuffled": [pred("1", True, "B", {"A": "b", "B": "a"}), pred("2", False, "A", {"A": "b", "B": "a"})]})
    >>> row["image_reliance"], row["option_consistency"], row["swapped_accuracy"]
    (0.5, 0.5, 0.5)
    """
    values = per_item(original, variants)
    row: dict[str, Any] = {key: sum(v.values()) / len(v) if v else None for key, v in values.items()}
    row["format"] = {name: sum(p.format_ok for p in preds) / len(preds) for name, preds in variants.items() if preds}
    row["count"] = {name: len(preds) for name, preds in variants.items()}
    row["items"] = len(values["accuracy"])
    return row


def stage_comparisons(
    a: tuple[list[Prediction], dict[str, list[Prediction]]],
    b: tuple[list[Prediction], dict[str, list[Prediction]]],
    bootstrap: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """Column -> {diff, ci_low, ci_high, num_items}: ``a - b`` on the items both stages have."""
    values_a, values_b = per_item(*a), per_item(*b)
    out = {}
    for key, _ in COLUMNS:
        if key not in values_a or key not in values_b:
            continue
        ids = set(values_a[key]) & set(values_b[key])
        if not ids:
            continue
        d = paired_mean_difference(
            {i: values_a[key][i] for i in ids}, {i: values_b[key][i] for i in ids}, **bootstrap
        )
        out[key] = {"diff": d.estimate, "ci_low": d.low, "ci_high": d.high, "num_items": d.num_items}
    return out


def report_section(
    stages: dict[str, tuple[list[Prediction], dict[str, list[Prediction]]]],
    comparisons: list[tuple[str, str]],
    bootstrap: dict[str, Any],
) -> dict[str, Any]:
    """The report's ``counterfactual`` part: per stage its columns with a bootstrap interval each
    (image reliance: the paired interval of accuracy - swapped accuracy), and per comparison whose
    two stages both have variants, each column's paired difference."""
    from pathvlm_lightning.eval.bootstrap import accuracy_interval

    rows = {}
    for name, (original, variants) in stages.items():
        row = stage_row(original, variants)
        values = per_item(original, variants)
        intervals = {}
        for key, column in values.items():
            if not column:
                continue
            if key == "image_reliance":
                swapped = values["swapped_accuracy"]
                d = paired_mean_difference({i: values["accuracy"][i] for i in swapped}, swapped, **bootstrap)
                intervals[key] = [d.low, d.high]
            else:
                interval = accuracy_interval([bool(v) for v in column.values()], **bootstrap)
                intervals[key] = [interval.low, interval.high]
        rows[name] = {**row, "ci": intervals}
    compared = []
    for a, b in comparisons:
        if a in stages and b in stages and stages[a][1] and stages[b][1]:
            compared.append({"a": a, "b": b, "columns": stage_comparisons(stages[a], stages[b], bootstrap)})
    return {"stages": rows, "comparisons": compared}


def section_markdown(section: dict[str, Any], level: int) -> list[str]:
    """Two tables: the columns per stage (percentages, interval below), and the paired differences."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    def points(value: float) -> str:
        return f"{round(100 * value, 1) + 0.0:+.1f}"

    rows = section["stages"]
    keys = [(key, header) for key, header in COLUMNS if any(row.get(key) is not None for row in rows.values())]
    counts = sorted({row["items"] for row in rows.values() if row.get("items")})
    items = " or ".join(f"{n:,}" for n in counts) + " per stage"
    lines = ["## Counterfactual inputs", "",
             "Accuracy with the image blanked (mean grey), swapped for another answer's image, left out, and with "
             "the options shuffled; image reliance = accuracy - swapped-image accuracy; option consistency = share "
             f"of questions whose chosen option text survives the shuffle. Percentages, {level}% CI in brackets; "
             "every column, accuracy included, on the items asked under the variants (" + items + ").", ""]
    lines.append("| stage | " + " | ".join(f"{header} %" for _, header in keys) + " |")
    lines.append("|" + "---|" * (len(keys) + 1))
    for name, row in rows.items():
        cells = []
        for key, _ in keys:
            ci = row["ci"].get(key)
            cells.append(pct(row.get(key)) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if section["comparisons"]:
        lines += ["", f"Paired differences (points, {level}% CI) on the items both stages answered:", ""]
        lines.append("| a vs b | " + " | ".join(header for _, header in keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 1))
        for c in section["comparisons"]:
            cells = []
            for key, _ in keys:
                d = c["columns"].get(key)
                cells.append("-" if d is None else f"{points(d['diff'])} [{points(d['ci_low'])}, {points(d['ci_high'])}]")
            lines.append(f"| {c['a']} vs {c['b']} | " + " | ".join(cells) + " |")
    return lines
