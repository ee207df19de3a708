"""Feature claims in a chain of thought, read in the embedded set's fixed vocabulary, and a tile's truth.

The embedded set's generator knows each tile's features (``extra["spec"]``: stain, nuclear size
grade, density grade; ``data/synthetic.py``) and its demonstrations describe them in a fixed
vocabulary ("tiny dots about 5 pixels across", "About thirty nuclei crowd the tile", "so not
enlarged", "the background is pale blue and most nuclei are brown"). :func:`feature_claims` reads
the claims a chain makes in that vocabulary; each claim is a set of feature values it allows
("enlarged" allows the large and very large grades), true when the tile's value is in it.

Sentences that state a rule rather than what this tile shows, talk about the question or its options
or rule one out ("sparse is unlikely"), the conclusion ("so the answer is large"), and sentences that
name no subject (nuclei, tile, background, tissue: a bare "dense" or a pasted option list) make no
claim. The reasoning read is the ``<think>`` text (every block; an unclosed block up to the end), or
the whole completion when there is none.

One reader for two consumers, so they read a chain the same way: the truth scorer reward
(``rewards/truth.py``) and the faithfulness metric (``eval/faithfulness.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pathvlm_lightning.data.synthetic_tiles import STAIN_CLASSES

#: The features each embedded question type depends on.
NEEDED = {"stain": {"stain"}, "nuclear_size": {"size"}, "nuclear_density": {"density"}, "grade": {"size", "density"}}
_IHC = frozenset(STAIN_CLASSES[1:])
# (pattern, feature, values allowed); tried left to right at each position, longer phrases first.
_PHRASES: tuple[tuple[str, str, frozenset], ...] = (
    (r"tiny dots", "size", frozenset({0})),
    (r"modest ovals", "size", frozenset({1})),
    (r"very large ovals", "size", frozenset({3})),
    (r"large ovals", "size", frozenset({2})),
    (r"nuclei are very large", "size", frozenset({3})),
    (r"nuclei are large", "size", frozenset({2})),
    (r"nuclei are medium", "size", frozenset({1})),
    (r"nuclei are small", "size", frozenset({0})),
    (r"not enlarged", "size", frozenset({0, 1})),
    (r"enlarged", "size", frozenset({2, 3})),
    (r"only a handful of nuclei", "density", frozenset({0})),
    (r"about ten nuclei", "density", frozenset({1})),
    (r"around twenty nuclei", "density", frozenset({2})),
    (r"about thirty nuclei", "density", frozenset({3})),
    (r"very dense", "density", frozenset({3})),
    (r"dense", "density", frozenset({2})),
    (r"moderate", "density", frozenset({1})),
    (r"sparse", "density", frozenset({0})),
    (r"not crowded", "density", frozenset({0, 1})),
    (r"crowded", "density", frozenset({2, 3})),
    (r"background is pink", "stain", frozenset({"H&E"})),
    (r"nuclei are purple", "stain", frozenset({"H&E"})),
    (r"background is pale blue", "stain", _IHC),
    (r"every nucleus is blue, none brown", "stain", frozenset({STAIN_CLASSES[1]})),
    (r"some nuclei are brown but most are blue", "stain", frozenset({STAIN_CLASSES[2]})),
    (r"most nuclei are brown", "stain", frozenset({STAIN_CLASSES[3]})),
)
_CLAIM = re.compile("|".join(f"(?P<p{i}>\\b{p}\\b)" for i, (p, _, _) in enumerate(_PHRASES)), re.IGNORECASE)
_NOT_ABOUT_THE_TILE = re.compile(
    r"\b(graded|suggests?|indicates?|look benign|stain$|positivity|question|options?|unlikely|ruled? out|excluded)\b",
    re.IGNORECASE,
)
#: A claim is about the tile only in a sentence that says what it describes: a bare option word
#: ("dense", "A) sparse") is an answer, not an observation.
_SUBJECT = re.compile(r"\b(nucle(?:us|i)|tile|background|tissue)\b", re.IGNORECASE)
_CONCLUSION = re.compile(r"\b(so\s+)?the answer is\b.*", re.IGNORECASE | re.DOTALL)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    feature: str  # "stain", "size" or "density"
    allowed: frozenset  # the values the claim allows (a stain class, or grade indices 0-3)
    text: str


def feature_claims(completion: str) -> list[Claim]:
    """The feature claims in ``completion``'s reasoning (its ``<think>`` text, even if cut off).

    >>> [(c.feature, sorted(c.allowed), c.text) for c in feature_claims(
    ...     "<think>The nuclei are large, so enlarged, and sparse, so not crowded. Enlarged nuclei that are not "
    ...     "crowded suggest atypia, so the answer is atypical.</think><answer>C) atypical</answer>")]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('size', [2], 'nuclei are large'), ('size', [2, 3], 'enlarged'), ('density', [0], 'sparse'),
     ('density', [0, 1], 'not crowded')]
    """
    blocks = _THINK.findall(completion)
    reasoning = "\n".join(blocks) if blocks else completion
    claims = []
    for sentence in re.split(r"(?<=[.!?;])\s+|\n", reasoning):
        sentence = _CONCLUSION.sub("", sentence).strip().rstrip(".")
        if not sentence or _NOT_ABOUT_THE_TILE.search(sentence) or not _SUBJECT.search(sentence):
            continue
        for match in _CLAIM.finditer(sentence):
            index = int(match.lastgroup[1:])
            _, feature, allowed = _PHRASES[index]
            claims.append(Claim(feature, allowed, match.group(0)))
    return claims


def tile_truth(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The feature values of a tile spec (``extra["spec"]`` of an embedded record); None for others."""
    if not spec or not {"stain", "size_grade", "density_grade"} <= set(spec):
        return None
    return {"stain": spec["stain"], "size": spec["size_grade"], "density": spec["density_grade"]}
