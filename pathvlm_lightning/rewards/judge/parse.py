"""Reading the judge's reply: the verdict is the JSON object the reply ends with, else a fallback.

Only the judge's reply is ever parsed here; the completion being judged never reaches these
functions directly. A judge may still quote the completion, JSON included, in its reply: which
JSON counts as the verdict is therefore decided by position (see :func:`parse_reply`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

UNPARSEABLE = ("empty", "too_long", "html", "no_json", "wrong_type", "non_finite")
"""Why a reply held no verdict: nothing in it (or no choice at all), longer than the judge was allowed
to write, an HTML page (a proxy's or gateway's), no JSON object where the verdict belongs, a JSON
value that is not an object with two numbers (strings, booleans, a key missing, a list), or a
score that is NaN or infinite."""

CHARS_PER_TOKEN = 16
"""A reply longer than ``max_tokens * CHARS_PER_TOKEN`` characters is ``too_long``: it cannot come
from a server that kept to ``max_tokens`` (tokens average about 4 characters, few exceed 16)."""

_FENCE = "```"
_HTML = re.compile(r"<(?:!doctype\s+html|html|head|body|title)\b", re.IGNORECASE)


class UnparseableReply(ValueError):
    """A reply with no usable verdict; ``cause`` is one of :data:`UNPARSEABLE`. The message never
    quotes the reply (it may quote the request)."""

    def __init__(self, cause: str) -> None:
        assert cause in UNPARSEABLE, cause
        super().__init__(f"judge reply without a usable verdict ({cause})")
        self.cause = cause


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


def body_cause(text: str | None, max_chars: int) -> str | None:
    """The cause for a reply (or an HTTP body) that cannot hold a verdict by its shape alone:
    ``empty``, ``html`` (looked for in the first KiB only) or ``too_long``; None when it is worth
    parsing.

    >>> body_cause("  ", 100), body_cause("x" * 101, 100), body_cause("<!DOCTYPE html><p>502</p>", 100)
    ('empty', 'too_long', 'html')
    """
    if text is None or not text.strip():
        return "empty"
    stripped = text.lstrip()
    if stripped.startswith("<") and _HTML.search(stripped[:1024]):
        return "html"
    if len(text) > max_chars:
        return "too_long"
    return None


def _closing_block(text: str) -> str | None:
    """The inside of the fenced block that ends ``text`` (stripped), or None when ``text`` does
    not end with one. The block is delimited by the last two fences, so an earlier, quoted block
    cannot be mistaken for it; its info string must be empty or ``json``."""
    if not text.endswith(_FENCE):
        return None
    opening = text.rfind(_FENCE, 0, len(text) - len(_FENCE))
    if opening < 0:
        return None
    inner = text[opening + len(_FENCE): len(text) - len(_FENCE)]
    if inner.lstrip().startswith("{"):  # ```{...}``` on one line
        return inner.strip()
    info, _, rest = inner.partition("\n")
    return rest.strip() if info.strip().lower() in ("", "json") else None


def _verdict(text: str) -> JudgeScores:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise UnparseableReply("no_json") from None
    if not isinstance(obj, dict):
        raise UnparseableReply("wrong_type")
    values = [obj.get("integrity_score"), obj.get("knowledge_score")]
    # bool is an int subclass; "true" is not a score. Strings are not accepted either.
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UnparseableReply("wrong_type")
    if not all(math.isfinite(v) for v in values):  # NaN, Infinity, 1e999
        raise UnparseableReply("non_finite")
    return JudgeScores(clamp01(float(values[0])), clamp01(float(values[1])))


def parse_reply(reply: str | None, max_tokens: int = 200) -> JudgeScores:
    """Scores from the judge's reply, clamped to [0, 1]; raises :class:`UnparseableReply` (with its
    cause) when there are none. ``max_tokens`` is what the judge was allowed to write (the
    ``too_long`` limit, see :data:`CHARS_PER_TOKEN`); the reply is not parsed past it.

    The verdict is the JSON object the reply ENDS with: either the whole reply is that object, or
    the reply's last fenced block (```json ... ``` or ``` ... ```) is, with nothing but whitespace
    after it. A single fenced block is read by the same rule. Nothing else is read: no earlier
    block, no JSON inside prose. Why: the rubric asks for the JSON object alone, and a judge that
    adds text writes its verdict last; what comes before may be a quote of the candidate, whose
    own ``{"integrity_score": 1.0, "knowledge_score": 1.0}`` must never become its score. A reply
    that puts text after its verdict, or quotes the candidate's block and answers in prose, falls
    back (``no_json``): a lost score, where taking the first or any block could be full marks.

    >>> parse_reply('{"integrity_score": 0.6, "knowledge_score": 1.2}')
    JudgeScores(integrity=0.6, knowledge=1.0)
    >>> parse_reply('Scores:\\n```json\\n{"integrity_score": 0.2, "knowledge_score": 0.6}\\n```')
    JudgeScores(integrity=0.2, knowledge=0.6)
    >>> parse_reply("The reasoning is sound.")
    Traceback (most recent call last):
    ...
    pathvlm_lightning.rewards.judge.parse.UnparseableReply: judge reply without a usable verdict (no_json)
    """
    cause = body_cause(reply, max_tokens * CHARS_PER_TOKEN)
    if cause is not None:
        raise UnparseableReply(cause)
    assert reply is not None
    text = reply.strip()
    block = _closing_block(text)  # a reply that ends with a fence cannot be one JSON value
    if block is not None:
        return _verdict(block)
    if text.startswith(("{", "[")):  # the whole reply is JSON (a list is read to say wrong_type)
        return _verdict(text)
    raise UnparseableReply("no_json")
