"""Reading the judge's reply, as the paper does: JSON, else a fenced JSON block, else a fallback.

Only the judge's reply is ever parsed here; the completion being judged never reaches these
functions, so JSON written inside a completion cannot become a score.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

_FENCED = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class JudgeScores:
    """The two rubric scores, each in [0, 1]."""

    integrity: float
    knowledge: float

    @property
    def reward(self) -> float:
        """The process reward: the mean of the two scores."""
        return (self.integrity + self.knowledge) / 2


def clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def fallback_scores(correct: bool) -> JudgeScores:
    """Scores used when the judge gives none: 0.5 each for a correct answer, 0 otherwise (the paper).

    >>> fallback_scores(True).reward, fallback_scores(False).reward
    (0.5, 0.0)
    """
    value = 0.5 if correct else 0.0
    return JudgeScores(value, value)


def _scores_from_json(text: str) -> JudgeScores | None:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    values = [obj.get("integrity_score"), obj.get("knowledge_score")]
    # bool is an int subclass; "true" is not a score. Strings are not accepted either.
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return JudgeScores(clamp01(float(values[0])), clamp01(float(values[1])))


def parse_reply(reply: str) -> JudgeScores | None:
    """Scores from the judge's reply, clamped to [0, 1]; None when neither the whole reply nor a
    fenced block in it is a JSON object with numeric ``integrity_score`` and ``knowledge_score``.

    >>> parse_reply('{"integrity_score": 0.6, "knowledge_score": 1.2}')
    JudgeScores(integrity=0.6, knowledge=1.0)
    >>> parse_reply('Scores:\\n```json\\n{"integrity_score": 0.2, "knowledge_score": 0.6}\\n```')
    JudgeScores(integrity=0.2, knowledge=0.6)
    >>> parse_reply("The reasoning is sound.") is None
    True
    """
    scores = _scores_from_json(reply.strip())
    if scores is not None:
        return scores
    for block in _FENCED.findall(reply):
        scores = _scores_from_json(block.strip())
        if scores is not None:
            return scores
    return None
