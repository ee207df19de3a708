"""Settings of the process-reward judge: which server, how patient, how much it may spend."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

OPENAI_BASE_URL = "https://api.openai.com/v1"
"""Where the openai client sends requests when neither ``base_url`` nor ``OPENAI_BASE_URL`` says."""


@dataclass
class JudgeConfig:
    """Judge server, patience and budget (the API key is never a value here, only its variable's name)."""

    model: str = "gpt-4o"
    """Judge model name, as the server knows it."""
    base_url: str | None = None
    """Server URL (``http://host:port/v1`` for any OpenAI-compatible server); None means OpenAI."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable holding the key (servers that ignore keys: set it to any value)."""
    temperature: float = 0.0
    """Sampling temperature of the judge."""
    max_tokens: int = 200
    """Longest judge reply, in tokens (the expected JSON needs about 20)."""
    timeout: float = 60.0
    """Seconds one HTTP attempt may take before it counts as a timeout."""
    max_retries: int = 3
    """Retries after a timeout, dropped connection, 408/409/429 or 5xx; other statuses are not retried."""
    step_deadline_s: float = 20.0
    """Seconds a training step waits for its judge replies, retries and backoff included (counted
    from ``begin``); what has not come back by then is cancelled and gets the fallback score.
    Training only: commands that judge a whole file (judge_consistency) wait for every reply."""
    max_auth_failures: int = 3
    """Consecutive requests rejected with 401/403 (or not sent: key variable unset) after which the
    fit stops with an error, rather than training on fallback scores only."""
    backoff_base: float = 1.0
    """First retry waits up to this many seconds (full jitter), doubling per retry."""
    backoff_max: float = 30.0
    """Longest wait between retries, also the cap on a server's Retry-After."""
    concurrency: int = 16
    """Requests in flight at once."""
    response_format_json: bool = True
    """Ask for ``response_format={"type": "json_object"}`` (turn off for servers that reject it)."""
    budget_requests: int | None = None
    """HTTP requests this process may send over the run (retries count); then fallback scores."""
    budget_tokens: int | None = None
    """Prompt + completion tokens this process may spend over the run; then fallback scores. Checked
    before each request, so requests already in flight may overshoot by up to ``concurrency`` replies.
    Counts what servers report (replies, and error bodies that carry ``usage``): a request that timed
    out or was cancelled counts towards ``budget_requests`` only, whatever the server billed for it."""
    cache_path: str | None = None
    """SQLite file of judged completions (e.g. in the run folder); a score in it is never paid twice."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"JudgeConfig: model must be a non-empty name, got {self.model!r}")
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            # The bad value is not quoted: it may be the key itself, pasted by mistake.
            raise ValueError(
                "JudgeConfig: api_key_env must be the NAME of an environment variable (letters, digits, _), "
                "got something else (not shown, in case it is the key itself)"
            )
        for name in ("temperature", "backoff_base", "backoff_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"JudgeConfig: {name} must be a finite number >= 0, got {value!r}")
        for name in ("timeout", "step_deadline_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"JudgeConfig: {name} must be > 0 seconds, got {value!r}")
        for name in ("max_tokens", "concurrency", "max_auth_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"JudgeConfig: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_retries < 0:
            raise ValueError(f"JudgeConfig: max_retries must be >= 0, got {self.max_retries!r}")
        for name in ("budget_requests", "budget_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"JudgeConfig: {name} must be None (no limit) or >= 0, got {value!r}")

    def endpoint(self) -> str:
        """The server requests go to, as ``host[:port]/path`` (``base_url``, else the openai client's
        own choice: ``OPENAI_BASE_URL``, else OpenAI). Without user info, query or fragment, which
        may carry credentials, so it is safe to log and to hash into the cache key.

        >>> JudgeConfig(base_url="https://user:pw@judge.example:8443/v1/?api-key=x").endpoint()
        'judge.example:8443/v1'
        """
        url = urlsplit(self.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL)
        host = url.hostname or ""
        port = f":{url.port}" if url.port else ""
        return f"{host}{port}{url.path.rstrip('/')}"
