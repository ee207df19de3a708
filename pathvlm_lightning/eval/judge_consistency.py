"""How consistent is the judge? Score the same saved completions K times and compare the rankings.

    python -m pathvlm_lightning.eval.judge_consistency --predictions preds.jsonl --repeats 3 \\
        [--records test.jsonl] [--master_keys 4] [--judge.model gpt-4o] [--judge.base_url URL] \\
        [--output rho.json]

Each line of ``--predictions`` holds a record's fields (``id``, ``question``, ``options``,
``answer``, ``image``) and the ``completion``, as the evaluation's ``predictions_*.jsonl`` do, so
they are read directly. ``--records`` (e.g. the split's ``test.jsonl``) supplies fields a line
lacks, looked up by ``id`` (for files written by hand or before predictions carried the image).
A relative image path is tried from the working directory, then from the file's folder. The
cache is always off here, or every repeat would return the first one's scores.

Reports Spearman's rho between the rewards of every pair of repeats and their mean (the paper:
0.785-0.814 over 500 chains and three runs).

It also sends the master-key battery (:mod:`pathvlm_lightning.rewards.master_keys`: ":",
"Thought process:", an empty think block, the options pasted back, ... each with the right answer)
for the first ``--master_keys`` records, once each, and reports how often the judge is fooled: the
share of those replies whose process reward is above ``FOOLED_ABOVE`` (0.2). Replies the judge gave
no verdict for (fallbacks) are left out of the rate and counted apart. ``--master_keys 0`` skips it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, set_parsing_settings

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.judge.client import JudgeClient
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.request import JudgeItem
from pathvlm_lightning.rewards.master_keys import FOOLED_ABOVE, master_key_replies

log = logging.getLogger(__name__)

_RECORD_FIELDS = ("id", "image", "question", "options", "answer")


def average_ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing the mean of the ranks they span.

    >>> average_ranks([0.5, 0.1, 0.5, 0.9])
    [2.5, 1.0, 2.5, 4.0]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of average ranks; NaN when either side is constant.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman: need two equal-length lists of 2+ values, got {len(x)} and {len(y)}")
    rx, ry = average_ranks(list(x)), average_ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def _resolve_image(image: str, source: Path) -> str:
    if Path(image).is_absolute() or Path(image).exists():
        return image
    return str(source.parent / image)


def load_items(predictions: str | Path, records: str | Path | None = None) -> list[JudgeItem]:
    """The judge items of a predictions file, fields it lacks filled from ``records`` by id."""
    predictions = Path(predictions)
    known: dict[str, dict[str, Any]] = {}
    if records is not None:
        with Path(records).open() as lines:
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    known[str(row["id"])] = {**row, "image": _resolve_image(row["image"], Path(records))}
    items = []
    with predictions.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "image" in row:
                row["image"] = _resolve_image(row["image"], predictions)
            merged = {**known.get(str(row.get("id")), {}), **row}
            missing = [name for name in (*_RECORD_FIELDS, "completion") if name not in merged]
            if missing:
                raise ValueError(
                    f"{predictions}:{number}: missing {missing} (id {row.get('id')!r}); "
                    "pass --records with the split's records to supply the image"
                )
            fields = {name: merged[name] for name in _RECORD_FIELDS}
            record = VQARecord(**{**fields, "id": str(fields["id"]), "options": dict(fields["options"])})
            items.append(JudgeItem.of(record, merged["completion"]))
    if len(items) < 2:
        raise ValueError(f"{predictions}: need at least 2 completions to rank, found {len(items)}")
    return items


def consistency(items: list[JudgeItem], config: JudgeConfig, repeats: int) -> dict[str, Any]:
    """Judge ``items`` ``repeats`` times (no cache) and compare every pair of runs."""
    if repeats < 2:
        raise ValueError(f"judge_consistency: --repeats must be >= 2 to compare runs, got {repeats}")
    client = JudgeClient(replace(config, cache_path=None))
    runs = []
    for repeat in range(repeats):
        results = client.score_batch(items)
        runs.append(results)
        fallbacks = sum(r.source == "fallback" for r in results)
        log.info("repeat %d: %d completions judged, %d fallbacks", repeat + 1, len(results), fallbacks)
    rewards = [[r.scores.reward for r in results] for results in runs]
    pairs = {f"{i + 1}-{j + 1}": spearman(rewards[i], rewards[j]) for i, j in combinations(range(repeats), 2)}
    finite = [rho for rho in pairs.values() if rho == rho]
    return {
        "completions": len(items),
        "repeats": repeats,
        "spearman": pairs,
        "mean_spearman": sum(finite) / len(finite) if finite else float("nan"),
        "fallbacks": [sum(r.source == "fallback" for r in results) for results in runs],
        "rewards": rewards,
    }


def master_key_rate(items: list[JudgeItem], config: JudgeConfig, records: int) -> dict[str, Any]:
    """Judge the master-key battery for the first ``records`` distinct records of ``items`` once; the
    share of replies (fallbacks left out) whose reward is above :data:`FOOLED_ABOVE`, overall and by kind."""
    chosen: dict[str, Any] = {}
    for item in items:
        if len(chosen) < records:
            chosen.setdefault(item.record.id, item.record)
    battery = [(name, JudgeItem.of(record, reply)) for record in chosen.values()
               for name, reply in master_key_replies(record).items()]
    results = JudgeClient(replace(config, cache_path=None)).score_batch([item for _, item in battery])
    judged = [(name, r.scores.reward) for (name, _), r in zip(battery, results) if r.source != "fallback"]
    kinds = sorted({name for name, _ in battery})

    def rate(rewards: list[float]) -> float:
        return sum(reward > FOOLED_ABOVE for reward in rewards) / len(rewards) if rewards else float("nan")

    return {
        "records": len(chosen),
        "replies": len(battery),
        "judged": len(judged),
        "fallbacks": len(battery) - len(judged),
        "fooled_above": FOOLED_ABOVE,
        "fooled_rate": rate([reward for _, reward in judged]),
        "fooled_rate_by_kind": {kind: rate([r for name, r in judged if name == kind]) for kind in kinds},
        "mean_reward": sum(r for _, r in judged) / len(judged) if judged else float("nan"),
    }


def _parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="python -m pathvlm_lightning.eval.judge_consistency",
        description="Judge saved completions K times; report Spearman's rho between every pair of runs.",
    )
    parser.add_argument("--predictions", type=str, required=True, help="JSONL of records + completion.")
    parser.add_argument("--records", type=str | None, default=None, help="JSONL records supplying missing fields.")
    parser.add_argument("--repeats", type=int, default=3, help="How many times each completion is judged.")
    parser.add_argument(
        "--master_keys", type=int, default=4,
        help="Send the master-key battery for this many records and report how often the judge is fooled (0: skip).",
    )
    parser.add_argument("--output", type=str | None, default=None, help="Write the report as JSON here.")
    parser.add_class_arguments(JudgeConfig, "judge")
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    namespace = parser.parse_args(args)
    config = parser.instantiate(namespace).judge
    if namespace.master_keys < 0:
        raise ValueError(f"judge_consistency: --master_keys must be >= 0, got {namespace.master_keys}")
    items = load_items(namespace.predictions, namespace.records)
    report = consistency(items, config, namespace.repeats)
    if namespace.master_keys:
        report["master_keys"] = master_key_rate(items, config, namespace.master_keys)
    for pair, rho in report["spearman"].items():
        print(f"runs {pair}: Spearman rho {rho:.3f}")
    print(f"mean over {len(report['spearman'])} pairs, {report['completions']} completions: "
          f"{report['mean_spearman']:.3f} (paper: 0.785-0.814); fallbacks per run {report['fallbacks']}")
    if "master_keys" in report:
        keys = report["master_keys"]
        worst = sorted(keys["fooled_rate_by_kind"].items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else -1))
        print(f"master keys: judge fooled (reward > {keys['fooled_above']}) by {keys['fooled_rate']:.1%} of "
              f"{keys['judged']} content-free replies (mean reward {keys['mean_reward']:.3f}; "
              f"{keys['fallbacks']} without a verdict); by kind: "
              + ", ".join(f"{kind} {value:.0%}" for kind, value in worst))
    if namespace.output:
        Path(namespace.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
