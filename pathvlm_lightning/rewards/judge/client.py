"""The judge client: one request per completion to an OpenAI-compatible server, faults absorbed.

Independent of Lightning: ``JudgeClient(config).score_batch(items)`` scores a list of
:class:`JudgeItem` and always returns one :class:`JudgeResult` per item. Timeouts, HTTP errors,
dropped connections, unreadable replies, refusals and a spent budget are counted by cause, logged
(never with the request text or the key) and answered with the paper's fallback scores.

The openai client's own retries are turned off so every attempt is counted (and budgeted) here.
The key is read from the environment variable named in the config at the start of each batch and
held only by that batch's short-lived openai client: it is never an attribute of this object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import openai

from pathvlm_lightning.rewards.judge.budget import JudgeBudget
from pathvlm_lightning.rewards.judge.cache import JudgeCache, cache_key
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.counters import JudgeResult
from pathvlm_lightning.rewards.judge.parse import JudgeScores, fallback_scores, parse_reply
from pathvlm_lightning.rewards.judge.request import (
    RUBRIC_VERSION,
    JudgeItem,
    build_messages,
    image_data_url,
    question_block,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
"""Statuses worth another try; any other error status (400, 401, 404 ...) would fail again."""


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


class JudgeClient:
    """Scores completions with the judge. Keeps the run's budget and (optionally) the cache."""

    def __init__(self, config: JudgeConfig) -> None:
        if not os.environ.get(config.api_key_env):
            raise ValueError(
                f"judge: environment variable {config.api_key_env} is not set; put the API key there "
                "(any value for a server that does not check keys)"
            )
        self.config = config
        self.budget = JudgeBudget(config.budget_requests, config.budget_tokens)
        self.cache = JudgeCache(config.cache_path) if config.cache_path else None
        # A private generator: jitter must not consume the global RNG that seeds training.
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def score_batch(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """Blocking form of :meth:`score_many` (not for use inside a running event loop)."""
        return asyncio.run(self.score_many(items))

    async def score_many(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item, in order; at most ``config.concurrency`` requests in flight.

        Identical completions of one batch (same image, question and text: common once a policy
        has converged) are judged once; each repeat shares that result (as a cache hit, or as the
        same fallback) with no requests or tokens of its own, so the counters add up to what was sent."""
        env_name = self.config.api_key_env
        if not os.environ.get(env_name):
            log.error("judge: environment variable %s is no longer set: fallback scores (counted as http_status)",
                      env_name)
            return [JudgeResult(fallback_scores(item.correct), "fallback", "http_status") for item in items]

        async def read_key() -> str:
            return os.environ.get(env_name, "")

        images: dict[str, tuple[str, str]] = {}
        keys = [self._key(item, images) for item in items]
        first: dict[str, int] = {}  # key -> index of its first item, in item order
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        semaphore = asyncio.Semaphore(self.config.concurrency)
        async with openai.AsyncOpenAI(
            api_key=read_key, base_url=self.config.base_url, timeout=self.config.timeout, max_retries=0
        ) as api:
            tasks = [self._score_one(api, semaphore, items[i], key, images[items[i].record.image][1])
                     for key, i in first.items()]
            judged = dict(zip(first, await asyncio.gather(*tasks)))
        return [judged[key] if first[key] == i else _repeat(judged[key]) for i, key in enumerate(keys)]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _image(self, item: JudgeItem, images: dict[str, tuple[str, str]]) -> tuple[str, str]:
        """(sha256, data URL) of the item's image, read once per batch for the G completions."""
        path = item.record.image
        if path not in images:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise FileNotFoundError(f"judge: image {path!r} of record {item.record.id!r}: {err}") from err
            images[path] = (hashlib.sha256(data).hexdigest(), image_data_url(data, source=path))
        return images[path]

    def _request_kwargs(self, item: JudgeItem, image_url: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": build_messages(item, image_url),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.response_format_json:
            kwargs["response_format"] = {"type": "json_object"}
        return kwargs

    def _key(self, item: JudgeItem, images: dict[str, tuple[str, str]]) -> str:
        """The cache key of ``item``: everything that decides the judge's answer."""
        image_sha, _ = self._image(item, images)
        return cache_key(
            self.config.model,
            RUBRIC_VERSION,
            image_sha,
            f"{question_block(item.record)}\n{item.record.reference}",
            item.completion,
        )

    async def _score_one(
        self, api: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, item: JudgeItem, key: str, image_url: str
    ) -> JudgeResult:
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            return JudgeResult(cached, "cache")
        kwargs = self._request_kwargs(item, image_url)
        latencies: list[float] = []
        tokens = [0, 0]  # prompt, completion
        waited = 0.0
        fault: str | None = None
        async with semaphore:
            for attempt in range(self.config.max_retries + 1):
                if not self.budget.take_request():
                    fault = "budget"
                    break
                start = time.perf_counter()
                scores, fault, retry_after = await self._attempt(api, kwargs, tokens)
                latencies.append(time.perf_counter() - start)
                if scores is not None:
                    if self.cache is not None:
                        self.cache.put(key, scores)
                    return JudgeResult(scores, "judge", None, len(latencies), *tokens, tuple(latencies), waited)
                retryable = fault in ("timeout", "connection") or (
                    fault == "http_status" and retry_after is not False
                )
                if not retryable or attempt == self.config.max_retries:
                    break
                delay = retry_after if isinstance(retry_after, float) else self._backoff(attempt)
                delay = min(delay, self.config.backoff_max)
                log.info("judge: %s on record %s, retry %d in %.2f s", fault, item.record.id, attempt + 1, delay)
                waited += delay
                await asyncio.sleep(delay)
        log.warning("judge: fallback score for record %s (%s)", item.record.id, fault)
        return JudgeResult(
            fallback_scores(item.correct), "fallback", fault, len(latencies), *tokens, tuple(latencies), waited
        )

    async def _attempt(
        self, api: openai.AsyncOpenAI, kwargs: dict[str, Any], tokens: list[int]
    ) -> tuple[JudgeScores | None, str | None, float | bool | None]:
        """One HTTP request: (scores, None, None) or (None, fault, retry hint). The hint is False
        for a status not worth retrying, the Retry-After seconds of a 429/503 when given, else None.
        Exception messages are not logged: a server's error text may echo part of the key."""
        try:
            response = await api.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            return None, "timeout", None
        except openai.APIConnectionError:
            return None, "connection", None
        except openai.APIStatusError as err:
            status = err.status_code
            if status not in RETRY_STATUSES:
                log.warning("judge: HTTP %d, not retried", status)
                return None, "http_status", False
            hint = retry_after_seconds(err.response.headers.get("retry-after")) if status in (429, 503) else None
            return None, "http_status", hint
        except (openai.APIError, json.JSONDecodeError):  # a 2xx body the client could not read
            return None, "unparseable", False
        usage = getattr(response, "usage", None)
        if usage is not None:
            tokens[0] += usage.prompt_tokens or 0
            tokens[1] += usage.completion_tokens or 0
            self.budget.add_tokens((usage.prompt_tokens or 0) + (usage.completion_tokens or 0))
        try:
            choice = response.choices[0]
            message = choice.message
            refused = bool(getattr(message, "refusal", None)) or choice.finish_reason == "content_filter"
            content = message.content
        except (AttributeError, IndexError, TypeError):
            return None, "unparseable", False
        if refused:
            return None, "refusal", False
        scores = parse_reply(content) if isinstance(content, str) else None
        return (scores, None, None) if scores is not None else (None, "unparseable", False)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2**attempt], capped by ``backoff_max``."""
        return self._rng.uniform(0.0, min(self.config.backoff_max, self.config.backoff_base * 2**attempt))


def _repeat(result: JudgeResult) -> JudgeResult:
    """What a repeat of an already judged completion gets: the same scores, nothing spent."""
    source = "fallback" if result.source == "fallback" else "cache"
    return JudgeResult(result.scores, source, result.fault)
