"""Analysis of the pre-registered process-reward experiment (experiments/process_reward.md).

Reads ``<root>/s<seed>/{sft,beta,r1}/predictions_test.jsonl`` (and its counterfactual variants when present)
for every seed and the arms ``alpha``, ``beta`` and ``r1``; prints every seed's numbers and the
pooled paired interval of R1 - Beta on the primary metric as JSON and Markdown.

Primary metric, as pre-registered: the share of test chains on grade questions that name every
feature the question depends on (``eval/faithfulness.py``'s ``names_needed``). Pooling: items are
paired within each seed; each bootstrap resample draws items with replacement within every seed and
averages the seeds' mean differences (10,000 resamples, seed 0).

Run:  python experiments/process_reward_analysis.py runs/experiment --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pathvlm_lightning.eval import counterfactual, faithfulness
from pathvlm_lightning.eval.bootstrap import paired_mean_difference
from pathvlm_lightning.eval.report import load_predictions

ARMS = {"alpha": "sft", "beta": "beta", "r1": "r1"}  # arm -> folder (Alpha is the SFT run)


def pooled_paired_interval(
    a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]], *, num_resamples: int = 10000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, float]:
    """Mean over seeds of ``mean(a_s) - mean(b_s)``, with a bootstrap resampling items within each seed.

    >>> r = pooled_paired_interval([{"x": 1.0, "y": 1.0}, {"x": 1.0, "y": 0.0}], [{"x": 0.0, "y": 1.0}, {"x": 0.0, "y": 0.0}])
    >>> r["estimate"], r["items"]
    (0.5, 4)
    """
    if len(a) != len(b) or not a:
        raise ValueError("pooled_paired_interval: give one mapping per seed on each side")
    diffs = []
    for s, (left, right) in enumerate(zip(a, b)):
        if set(left) != set(right):
            raise ValueError(f"pooled_paired_interval: seed #{s} has different items on the two sides")
        ids = sorted(left)
        diffs.append(np.array([left[i] - right[i] for i in ids], dtype=np.float64))  # [N_s]
    rng = np.random.default_rng(seed)
    means = np.zeros(num_resamples)
    for d in diffs:
        means += d[rng.integers(0, len(d), size=(num_resamples, len(d)))].mean(axis=1)
    means /= len(diffs)
    tail = (1 - level) / 2
    return {
        "estimate": float(np.mean([d.mean() for d in diffs])),
        "ci_low": float(np.quantile(means, tail)),
        "ci_high": float(np.quantile(means, 1 - tail)),
        "items": int(sum(len(d) for d in diffs)),
    }


def arm_metrics(path: Path) -> tuple[dict, dict[str, dict[str, float]]]:
    """Summary numbers of one arm's test predictions, and its per-item columns for paired comparisons."""
    preds = load_predictions(path)
    variants = {name: load_predictions(counterfactual.variant_path(path, name))
                for name in counterfactual.COUNTERFACTUALS if counterfactual.variant_path(path, name).is_file()}
    items = counterfactual.per_item(preds, variants)
    faithful = faithfulness.per_item(preds)
    grade_ids = {p.id for p in preds if p.subset == "grade"}
    items["grade_names_needed"] = {i: v for i, v in faithful["names_needed_share"].items() if i in grade_ids}
    items["claims_per_chain"] = faithful["claims_per_chain"]
    summary = {
        "accuracy": float(np.mean([p.correct for p in preds])),
        "accuracy_by_type": {s: float(np.mean([p.correct for p in preds if p.subset == s]))
                             for s in sorted({p.subset for p in preds})},
        "faithfulness": faithfulness.stage_faithfulness(preds),
        **{k: float(np.mean(list(v.values()))) for k, v in items.items() if k != "accuracy" and v},
    }
    return summary, items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    root = Path(args.root)
    per_seed, columns = {}, {}
    for s in args.seeds:
        for arm in ARMS:
            path = root / f"s{s}" / ARMS[arm] / "predictions_test.jsonl"
            if path.is_file():
                per_seed[(s, arm)], columns[(s, arm)] = arm_metrics(path)
    done = [s for s in args.seeds if (s, "beta") in columns and (s, "r1") in columns]
    out = {"seeds": {f"s{s}/{arm}": v for (s, arm), v in per_seed.items()}, "seeds_with_both_arms": done}
    if done:
        comparisons = {}
        for column in ("grade_names_needed", "accuracy", "claims_per_chain", "image_reliance", "option_consistency",
                       "blank_accuracy", "no_image_accuracy"):
            if all(column in columns[(s, arm)] for s in done for arm in ("beta", "r1")):
                comparisons[column] = pooled_paired_interval([columns[(s, "r1")][column] for s in done],
                                                             [columns[(s, "beta")][column] for s in done])
                comparisons[column]["per_seed"] = {
                    f"s{s}": dataclasses.asdict(paired_mean_difference(columns[(s, "r1")][column], columns[(s, "beta")][column]))
                    for s in done}
        out["r1_minus_beta"] = comparisons
    print(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
