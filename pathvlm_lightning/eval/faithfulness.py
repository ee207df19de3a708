"""Chain faithfulness where the truth is known: every feature claim a chain makes, checked against the tile.

The embedded set's generator knows each tile's features (``extra["spec"]``: stain, nuclear size
grade, density grade; ``data/synthetic.py``) and its demonstrations describe them in a fixed
vocabulary ("tiny dots about 5 pixels across", "About thirty nuclei crowd the tile", "so not
enlarged", "the background is pale blue and most nuclei are brown"). :func:`feature_claims` reads
the claims a chain makes in that vocabulary; each claim is a set of feature values it allows
("enlarged" allows the large and very large grades), true when the tile's value is in it. The
reader lives in ``rewards/claims.py``, shared with the truth scorer reward.

Sentences that state a rule rather than what this tile shows ("Nuclear size is graded ... by
diameter", "Enlarged and crowded nuclei suggest a high-grade lesion", "Brown DAB in most nuclei is
diffuse IHC positivity"), talk about the question or its options or rule one out ("sparse is
unlikely"), the conclusion ("so the answer is large"), and sentences that name no subject (nuclei,
tile, background, tissue: a bare "dense" or a pasted option list) make no claim: an answer is graded
by accuracy, not here.

Per chain: the claims, how many are true, and whether it names every feature its question depends on
(stain -> stain, nuclear_size -> size, nuclear_density -> density, grade -> size and density). For
data without a tile spec the columns are absent (no judge-based variant yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pathvlm_lightning.rewards.claims import NEEDED, Claim, feature_claims, tile_truth

__all__ = ["NEEDED", "Claim", "ChainScore", "feature_claims", "tile_truth", "score_chain"]


@dataclass(frozen=True)
class ChainScore:
    claims: int
    true_claims: int
    names_needed: bool  # every feature the question depends on is claimed at least once (true or not)


def score_chain(completion: str, truth: dict[str, Any], subset: str) -> ChainScore:
    """Claims of one chain checked against the tile's ``truth`` (:func:`tile_truth`).

    >>> truth = {"stain": "H&E", "size": 3, "density": 0}
    >>> score_chain("<think>The nuclei are very large, so enlarged, and dense, so crowded.</think>", truth, "grade")
    ChainScore(claims=4, true_claims=2, names_needed=True)
    >>> score_chain("<think>The nuclei are very large ovals about 14 pixels across.</think>", truth, "grade")
    ChainScore(claims=1, true_claims=1, names_needed=False)
    """
    claims = feature_claims(completion)
    true = sum(truth[c.feature] in c.allowed for c in claims)
    named = {c.feature for c in claims}
    return ChainScore(len(claims), true, NEEDED.get(subset, set()) <= named and subset in NEEDED)


def summarize_faithfulness(rows: list[tuple[str, ChainScore]]) -> dict[str, Any]:
    """Claims per chain, share of claims that are true (None without claims), share of chains naming
    every needed feature; ``rows`` are (question type, score)."""
    n = len(rows)
    claims = sum(s.claims for _, s in rows)
    return {
        "chains": n,
        "claims_per_chain": claims / n if n else None,
        "true_claim_share": sum(s.true_claims for _, s in rows) / claims if claims else None,
        "names_needed_share": sum(s.names_needed for _, s in rows) / n if n else None,
    }


def stage_faithfulness(predictions: list[Any]) -> dict[str, Any] | None:
    """A stage's faithfulness overall and per question type, from its predictions' ``spec``; None
    when no prediction has a tile spec (data with no known features)."""
    rows = []
    for p in predictions:
        truth = tile_truth(p.spec)
        if truth is not None and p.subset in NEEDED:
            rows.append((p.id, p.subset, score_chain(p.completion, truth, p.subset)))
    if not rows:
        return None
    by_type = {}
    for subset in sorted({subset for _, subset, _ in rows}):
        by_type[subset] = summarize_faithfulness([(t, s) for _, t, s in rows if t == subset])
    return {**summarize_faithfulness([(t, s) for _, t, s in rows]), "by_subset": by_type}


def per_item(predictions: list[Any]) -> dict[str, dict[str, float]]:
    """Column -> item id -> value, for the paired stage comparisons: claims made, whether the chain
    names every needed feature, and the share of its claims that are true (only for a chain that
    makes claims: a paired difference of this column is on the items where both chains make some,
    and it averages per chain, where the stage table's share pools all claims).

    >>> from types import SimpleNamespace
    >>> spec = {"stain": "H&E", "size_grade": 3, "density_grade": 0}
    >>> preds = [SimpleNamespace(id="q1", spec=spec, subset="grade",
    ...                          completion="<think>The nuclei are very large, so enlarged, and dense, so crowded.</think>")]
    >>> per_item(preds)
    {'claims_per_chain': {'q1': 4.0}, 'names_needed_share': {'q1': 1.0}, 'true_share_per_chain': {'q1': 0.5}}
    """
    out: dict[str, dict[str, float]] = {"claims_per_chain": {}, "names_needed_share": {}, "true_share_per_chain": {}}
    for p in predictions:
        truth = tile_truth(p.spec)
        if truth is not None and p.subset in NEEDED:
            score = score_chain(p.completion, truth, p.subset)
            out["claims_per_chain"][p.id] = float(score.claims)
            out["names_needed_share"][p.id] = float(score.names_needed)
            if score.claims:
                out["true_share_per_chain"][p.id] = score.true_claims / score.claims
    return out


def faithfulness_markdown(rows: dict[str, dict[str, Any]], comparisons: list[dict[str, Any]], level: int) -> list[str]:
    """The stage table (overall and per question type) and the paired differences."""

    def num(value: float | None, scale: float = 100.0) -> str:
        return "-" if value is None else f"{scale * value:.1f}"

    subsets = sorted({s for row in rows.values() for s in row["by_subset"]})
    lines = ["## Chain faithfulness (tile truth known)", "",
             "Feature claims in each chain checked against the tile's drawn features: claims per chain, % of "
             "claims that are true, % of chains naming every feature the question depends on.", ""]
    header = ["stage", "claims/chain", "true %", "names needed %"]
    header += [f"{s}: true % / needed %" for s in subsets]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, num(row["claims_per_chain"], 1.0), num(row["true_claim_share"]), num(row["names_needed_share"])]
        for s in subsets:
            sub = row["by_subset"].get(s)
            cells.append("-" if sub is None else f"{num(sub['true_claim_share'])} / {num(sub['names_needed_share'])}")
        lines.append("| " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", f"Paired differences ({level}% CI) on the items both stages answered (true share: the "
                  "share of a chain's claims that are true, on the items where both chains make claims):", "",
                  "| a vs b | claims/chain | names needed (points) | true share per chain (points) |",
                  "|---|---|---|---|"]

        def points(d: dict[str, float] | None) -> str:
            return "-" if d is None else (
                f"{100 * d['diff'] + 0.0:+.1f} [{100 * d['ci_low'] + 0.0:+.1f}, {100 * d['ci_high'] + 0.0:+.1f}]")

        for c in comparisons:
            k = c["columns"].get("claims_per_chain")
            claims = "-" if k is None else f"{k['diff']:+.2f} [{k['ci_low']:+.2f}, {k['ci_high']:+.2f}]"
            needed, true = points(c["columns"].get("names_needed_share")), points(c["columns"].get("true_share_per_chain"))
            lines.append(f"| {c['a']} vs {c['b']} | {claims} | {needed} | {true} |")
    return lines
