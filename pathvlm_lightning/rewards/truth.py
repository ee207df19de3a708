"""An image-aware offline process reward: each feature claim of a chain checked against the tile's truth.

The paper's judge sees the image and checks the chain against it. On the embedded set the generator
knows what each tile shows (``extra["spec"]``), so an offline scorer can do the same: it reads the
chain's feature claims with the reader the faithfulness metric uses (``eval/faithfulness.py``, so
reward and metric read a chain alike) and pays for true claims, charges for false ones.

Arithmetic, for a record whose question depends on the features ``needed`` (grade: size and
density; nuclear_size: size; ...):

- each needed feature scores ``(true - false) / claims`` over the chain's claims about it, 0 when the
  chain makes none: naming a feature rightly earns, naming it wrongly costs, saying nothing is 0;
- each other feature the chain makes a claim about scores ``min(0, (true - false) / claims)``: a
  false claim costs, a true one earns nothing (no credit for padding);
- the reward is the sum divided by ``len(needed)``, clipped to [-1, 1].

A chain that makes no claim (a master-key reply, an empty or missing think block, a pasted option
list, a bare answer) scores 0; a repeated claim weighs as much as a single one. Only the ``<think>``
text is read; the conclusion ("so the answer is ...") and sentences about rules, the question or its
options make no claim, so the answer option itself is never paid for.
"""

from __future__ import annotations

import re
from typing import Any

from pathvlm_lightning.rewards.claims import NEEDED, feature_claims, tile_truth

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)


def truth_score(completion: str, truth: dict[str, Any], subset: str) -> float:
    """The reward of one chain given the tile's ``truth`` (:func:`eval.faithfulness.tile_truth`).

    >>> truth = {"stain": "H&E", "size": 3, "density": 0}
    >>> truth_score("<think>The nuclei are very large, so enlarged, and sparse, so not crowded.</think>", truth, "grade")
    1.0
    >>> truth_score("<think>The nuclei are very large, so enlarged.</think>", truth, "grade")  # density not named
    0.5
    >>> truth_score("<think>The nuclei are very large, so enlarged, and dense, so crowded.</think>", truth, "grade")
    0.0
    """
    if subset not in NEEDED:
        raise ValueError(f"truth_score: no known features for question type {subset!r}; expected one of {sorted(NEEDED)}")
    if not _THINK_OPEN.search(completion):
        return 0.0
    needed = NEEDED[subset]
    by_feature: dict[str, list[bool]] = {}
    for claim in feature_claims(completion):
        by_feature.setdefault(claim.feature, []).append(truth[claim.feature] in claim.allowed)
    total = 0.0
    for feature, verdicts in by_feature.items():
        net = (2 * sum(verdicts) - len(verdicts)) / len(verdicts)  # (true - false) / claims
        total += net if feature in needed else min(0.0, net)
    return max(-1.0, min(1.0, total / len(needed)))


def truth_reward(completion: str, record: Any) -> float:
    """:func:`truth_score` for a record carrying its tile's spec in ``extra["spec"]``."""
    truth = tile_truth(record.extra.get("spec") if isinstance(record.extra, dict) else None)
    if truth is None:
        raise ValueError(
            f"truth_reward: record {record.id!r} has no tile spec (extra['spec'] with stain, size_grade and "
            "density_grade); the truth scorer needs data whose features are known (data_path: embedded)"
        )
    return truth_score(completion, truth, record.subset)
