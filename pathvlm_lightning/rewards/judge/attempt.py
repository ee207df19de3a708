"""One HTTP request to the judge, read into a typed :class:`Attempt`: scores, or the fault and
whether another try could help, plus the tokens the server reported. No state, no budget, no logs:
:class:`~pathvlm_lightning.rewards.judge.client.JudgeClient` decides what to do with it.

Exception messages are never kept: a server's error text may echo part of the key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import openai

from pathvlm_lightning.rewards.judge.parse import (
    CHARS_PER_TOKEN,
    JudgeScores,
    UnparseableReply,
    body_cause,
    parse_reply,
)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
"""Statuses worth another try; any other error status (400, 404 ...) would fail again."""
AUTH_STATUSES = frozenset({401, 403})
"""The endpoint rejected the credentials: counted as ``auth``, never retried."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    >>> retry_after_seconds("2"), retry_after_seconds("soon")
    (2.0, None)
    >>> retry_after_seconds("Thu, 01 Jan 1970 00:00:30 GMT", now=10.0)
    20.0
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(seconds, 0.0) if seconds == seconds else None


@dataclass(frozen=True)
class Attempt:
    """What one request gave. ``scores`` is set exactly when ``fault`` is None. ``status`` is the
    HTTP status when the server answered at all; ``retry_after`` the wait a 429/503 asked for."""

    scores: JudgeScores | None = None
    fault: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _usage(obj: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a ``usage`` object or dict; zeros when absent or not numbers."""
    if obj is None:
        return 0, 0
    get = obj.get if isinstance(obj, dict) else lambda name: getattr(obj, name, None)

    def count(name: str) -> int:
        value = get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


def _error_usage(response: Any) -> tuple[int, int]:
    """Tokens an error reply reports (some servers bill failed requests and say so in the body)."""
    try:
        body = response.json()
    except (ValueError, AttributeError):
        return 0, 0
    return _usage(body.get("usage")) if isinstance(body, dict) else (0, 0)


async def send(api: openai.AsyncOpenAI, kwargs: dict[str, Any], max_tokens: int) -> Attempt:
    """One chat-completions request with ``kwargs``; never raises for what the server does."""
    try:
        raw = await api.chat.completions.with_raw_response.create(**kwargs)
    except openai.APITimeoutError:
        return Attempt(fault="timeout", retryable=True)
    except openai.APIConnectionError:
        return Attempt(fault="connection", retryable=True)
    except openai.APIStatusError as err:
        status = err.status_code
        tokens = _error_usage(err.response)
        if status in AUTH_STATUSES:
            return Attempt(fault="auth", status=status, prompt_tokens=tokens[0], completion_tokens=tokens[1])
        hint = retry_after_seconds(err.response.headers.get("retry-after")) if status in (429, 503) else None
        return Attempt(fault="http_status", retryable=status in RETRY_STATUSES, retry_after=hint, status=status,
                       prompt_tokens=tokens[0], completion_tokens=tokens[1])
    status = raw.status_code
    try:
        response = raw.parse()
    except (openai.APIError, json.JSONDecodeError):  # a 2xx body the client could not read
        cause = body_cause(raw.text, max_tokens * CHARS_PER_TOKEN) or "no_json"
        return Attempt(fault=f"unparseable/{cause}", status=status)
    prompt_tokens, completion_tokens = _usage(getattr(response, "usage", None))
    spent = dict(status=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    try:
        choice = response.choices[0]
        message = choice.message
        refused = bool(getattr(message, "refusal", None)) or choice.finish_reason == "content_filter"
        content = message.content
    except (AttributeError, IndexError, TypeError):  # no choices, or a body that is not a completion
        return Attempt(fault="unparseable/empty", **spent)
    if refused:
        return Attempt(fault="refusal", **spent)
    try:
        return Attempt(scores=parse_reply(content if isinstance(content, str) else None, max_tokens), **spent)
    except UnparseableReply as err:
        return Attempt(fault=f"unparseable/{err.cause}", **spent)
