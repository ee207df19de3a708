"""The judge client: one request per completion to an OpenAI-compatible server, faults absorbed.

Independent of Lightning: ``JudgeClient(config).score_batch(items)`` scores a list of
:class:`JudgeItem` and always returns one :class:`JudgeResult` per item. Timeouts, HTTP errors,
rejected credentials, dropped connections, unreadable replies, refusals, a spent budget and the
step's deadline are counted by cause, logged (never with the request text or the key) and
answered with the paper's fallback scores. Rejected credentials are also counted in a row
(:attr:`JudgeClient.auth_failures`) so the caller can stop the run (:meth:`JudgeClient.auth_error`).

The openai client's own retries are turned off so every attempt is counted (and budgeted) here.
The key is read from the environment variable named in the config at the start of each batch and
held only by that batch's short-lived openai client: it is never an attribute of this object.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from pathvlm_lightning.rewards.judge.attempt import Attempt, send
from pathvlm_lightning.rewards.judge.budget import JudgeBudget
from pathvlm_lightning.rewards.judge.cache import JudgeCache, cache_key
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.counters import JudgeResult
from pathvlm_lightning.rewards.judge.parse import JudgeScores, fallback_scores
from pathvlm_lightning.rewards.judge.request import (
    RUBRIC_VERSION,
    JudgeItem,
    build_judge_messages,
    image_data_url,
    question_block,
)

log = logging.getLogger(__name__)

# Faults logged once per batch or by the budget itself, not once per completion.
_SUMMARISED = frozenset({"budget", "deadline", "auth"})


class JudgeAuthError(RuntimeError):
    """The judge endpoint keeps rejecting the credentials (or the key's variable is unset)."""


@dataclass
class _Progress:
    """What one completion's attempts have cost so far; kept outside its task, so a completion
    cut off by the deadline still reports the requests and tokens it spent."""

    latencies: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    waited: float = 0.0

    def result(self, scores: JudgeScores, source: str, fault: str | None = None) -> JudgeResult:
        latencies = tuple(self.latencies)
        return JudgeResult(scores, source, fault, len(latencies), self.prompt_tokens, self.completion_tokens,
                           latencies, self.waited)


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
        self.auth_failures = 0
        """Requests rejected with 401/403 (or unsendable: key unset) since the last other answer."""
        self._auth_cause = ""
        # A private generator: jitter must not consume the global RNG that seeds training.
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def verdict_settings(self) -> dict[str, Any]:
        """Every setting that changes the judge's verdict, hashed into the cache key. The endpoint
        is host, port and path only (see :meth:`JudgeConfig.endpoint`); the key is never part of it."""
        return {
            "model": self.config.model,
            "rubric_version": RUBRIC_VERSION,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "response_format": self._response_format(),
            "endpoint": self.config.endpoint(),
        }

    def auth_rejected(self) -> bool:
        """True once ``config.max_auth_failures`` requests in a row had their credentials rejected."""
        return self.auth_failures >= self.config.max_auth_failures

    def auth_error(self, on_this_rank: bool = True) -> JudgeAuthError:
        """The error that stops the run; names the variable, never its value."""
        env, limit = self.config.api_key_env, self.config.max_auth_failures
        if on_this_rank:
            what = f"{self._auth_cause}, {self.auth_failures} requests in a row"
        else:
            what = f"seen on another rank: HTTP 401/403 or the variable unset, at least {limit} requests in a row"
        return JudgeAuthError(
            f"judge: the endpoint {self.config.endpoint()} rejected the credentials from the environment variable "
            f"{env} ({what}; judge.max_auth_failures = {limit}). Put a valid key in {env}. The fit stops "
            "rather than train on fallback scores only."
        )

    def score_batch(self, items: list[JudgeItem], deadline_s: float | None = None) -> list[JudgeResult]:
        """Blocking form of :meth:`score_many` (not for use inside a running event loop)."""
        return asyncio.run(self.score_many(items, deadline_s))

    async def score_many(self, items: list[JudgeItem], deadline_s: float | None = None) -> list[JudgeResult]:
        """One result per item, in order; at most ``config.concurrency`` requests in flight, and
        nothing waited for past ``deadline_s`` seconds (a training step passes
        ``config.step_deadline_s``; None waits for every reply): requests still open then are
        cancelled (their connections closed) and those completions fall back as ``deadline``.

        Identical completions of one batch (same image, question and text: common once a policy
        has converged) are judged once; each repeat shares that result (as a cache hit, or as the
        same fallback) with no requests or tokens of its own, so the counters add up to what was sent."""
        started = time.monotonic()
        env_name = self.config.api_key_env
        if not os.environ.get(env_name):
            self.auth_failures += len(items)
            self._auth_cause = "the variable is not set"
            log.error("judge: environment variable %s is no longer set: fallback scores (counted as auth)", env_name)
            return [JudgeResult(fallback_scores(item.correct), "fallback", "auth") for item in items]

        async def read_key() -> str:
            return os.environ.get(env_name, "")

        images: dict[str, tuple[str, str]] = {}
        keys = [self._key(item, images) for item in items]
        first: dict[str, int] = {}  # key -> index of its first item, in item order
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        progress = {key: _Progress() for key in first}
        semaphore = asyncio.Semaphore(self.config.concurrency)
        async with openai.AsyncOpenAI(
            api_key=read_key, base_url=self.config.base_url, timeout=self.config.timeout, max_retries=0
        ) as api:
            tasks = {
                key: asyncio.ensure_future(
                    self._score_one(api, semaphore, items[i], key, images[items[i].record.image][1], progress[key])
                )
                for key, i in first.items()
            }
            late: set[asyncio.Future[JudgeResult]] = set()
            if tasks:
                left = None if deadline_s is None else max(deadline_s - (time.monotonic() - started), 0.0)
                _, late = await asyncio.wait(tasks.values(), timeout=left)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        judged = {
            key: progress[key].result(fallback_scores(items[first[key]].correct), "fallback", "deadline")
            if task.cancelled() else task.result()
            for key, task in tasks.items()
        }
        self._log_summary(list(judged.values()), deadline_s)
        return [judged[key] if first[key] == i else _repeat(judged[key]) for i, key in enumerate(keys)]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _log_summary(self, results: list[JudgeResult], deadline_s: float | None) -> None:
        """One line per batch for the faults not logged per completion."""
        deadline = sum(r.fault == "deadline" for r in results)
        if deadline:
            log.warning("judge: %d of %d completions not judged within the step deadline of %.1f s: "
                        "requests cancelled, fallback scores", deadline, len(results), deadline_s)
        auth = sum(r.fault == "auth" for r in results)
        if auth:
            log.warning("judge: %d of %d completions fell back because %s rejected the credentials in %s",
                        auth, len(results), self.config.endpoint(), self.config.api_key_env)

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

    def _response_format(self) -> dict[str, str] | None:
        return {"type": "json_object"} if self.config.response_format_json else None

    def _request_kwargs(self, item: JudgeItem, image_url: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": build_judge_messages(item, image_url),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if (response_format := self._response_format()) is not None:
            kwargs["response_format"] = response_format
        return kwargs

    def _key(self, item: JudgeItem, images: dict[str, tuple[str, str]]) -> str:
        """The cache key of ``item``: the verdict settings and everything the request holds."""
        image_sha, _ = self._image(item, images)
        question = f"{question_block(item.record)}\n{item.record.reference}"
        return cache_key(self.verdict_settings(), image_sha, question, item.completion)

    async def _score_one(
        self, api: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, item: JudgeItem, key: str, image_url: str,
        progress: _Progress,
    ) -> JudgeResult:
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            return JudgeResult(cached, "cache")
        kwargs = self._request_kwargs(item, image_url)
        fault: str | None = None
        async with semaphore:
            for attempt in range(self.config.max_retries + 1):
                if self.auth_rejected():  # no point sending more with credentials the server rejects
                    fault = "auth"
                    break
                if not self.budget.take_request():
                    fault = "budget"
                    break
                start = time.perf_counter()
                try:
                    outcome = await send(api, kwargs, self.config.max_tokens)
                finally:  # also when the deadline cancels it: the request was sent
                    progress.latencies.append(time.perf_counter() - start)
                self._spend(outcome, progress)
                if outcome.scores is not None:
                    if self.cache is not None:
                        self.cache.put(key, outcome.scores)
                    return progress.result(outcome.scores, "judge")
                fault = outcome.fault
                if not outcome.retryable or attempt == self.config.max_retries:
                    break
                delay = outcome.retry_after if outcome.retry_after is not None else self._backoff(attempt)
                delay = min(delay, self.config.backoff_max)
                log.info("judge: %s on record %s, retry %d in %.2f s", fault, item.record.id, attempt + 1, delay)
                progress.waited += delay
                await asyncio.sleep(delay)
        if fault not in _SUMMARISED:
            log.warning("judge: fallback score for record %s (%s)", item.record.id, fault)
        return progress.result(fallback_scores(item.correct), "fallback", fault)

    def _spend(self, outcome: Attempt, progress: _Progress) -> None:
        """Book the tokens the server reported (on any reply, errors included) and the auth count."""
        progress.prompt_tokens += outcome.prompt_tokens
        progress.completion_tokens += outcome.completion_tokens
        self.budget.add_tokens(outcome.prompt_tokens + outcome.completion_tokens)
        if outcome.fault == "auth":
            self.auth_failures += 1
            self._auth_cause = f"HTTP {outcome.status}"
            log.warning(
                "judge: HTTP %d from %s: the endpoint rejected the credentials in %s "
                "(%d in a row; the fit stops at %d)",
                outcome.status, self.config.endpoint(), self.config.api_key_env, self.auth_failures,
                self.config.max_auth_failures,
            )
        elif outcome.status is not None:  # any other answer: the credentials were accepted
            self.auth_failures = 0
            if outcome.fault == "http_status" and not outcome.retryable:
                log.warning("judge: HTTP %d, not retried", outcome.status)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2**attempt], capped by ``backoff_max``."""
        return self._rng.uniform(0.0, min(self.config.backoff_max, self.config.backoff_base * 2**attempt))


def _repeat(result: JudgeResult) -> JudgeResult:
    """What a repeat of an already judged completion gets: the same scores, nothing spent."""
    source = "fallback" if result.source == "fallback" else "cache"
    return JudgeResult(result.scores, source, result.fault)
