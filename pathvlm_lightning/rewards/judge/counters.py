"""The outcome of judging one completion, and the per-step summary logged from many of them."""

from __future__ import annotations

from dataclasses import dataclass

from pathvlm_lightning.rewards.judge.parse import UNPARSEABLE, JudgeScores

FAULTS = (
    "timeout", "http_status", "connection", "auth", "deadline", "refusal", "budget",
    *(f"unparseable/{cause}" for cause in UNPARSEABLE),
)
"""Why a completion fell back: an attempt timed out, an HTTP error status (other than 401/403), a
dropped/refused connection, the credentials rejected (401/403, or the key's variable unset), the
step's deadline passed, a refusal (or content filter), a spent budget, or a reply with no usable
verdict (by cause, see :data:`~pathvlm_lightning.rewards.judge.parse.UNPARSEABLE`). Each fallback
has exactly one fault, so the ``fallback/*`` counters add up to ``fallbacks``."""


@dataclass(frozen=True)
class JudgeResult:
    """``source`` is "judge", "cache" or "fallback"; ``fault`` (one of FAULTS) says why a fallback
    happened, i.e. what stopped the last attempt. ``latencies`` holds one entry per HTTP request."""

    scores: JudgeScores
    source: str
    fault: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: tuple[float, ...] = ()
    retry_wait: float = 0.0


def summarize(results: list[JudgeResult]) -> dict[str, float]:
    """Scalars for one step's results (keys without prefix, zero counts included so curves are
    continuous).

    >>> r = JudgeResult(JudgeScores(0.6, 1.0), "judge", requests=2, latencies=(0.5, 1.5))
    >>> f = JudgeResult(JudgeScores(0.0, 0.0), "fallback", fault="timeout", requests=1, latencies=(2.0,))
    >>> s = summarize([r, f])
    >>> s["integrity"], s["requests"], s["retries"], s["fallback/timeout"], s["latency_max"]
    (0.3, 3.0, 1.0, 1.0, 2.0)
    """
    n = max(len(results), 1)
    latencies = [t for r in results for t in r.latencies]
    out = {
        "integrity": sum(r.scores.integrity for r in results) / n,
        "knowledge": sum(r.scores.knowledge for r in results) / n,
        "requests": float(sum(r.requests for r in results)),
        "retries": float(sum(max(r.requests - 1, 0) for r in results)),
        "cache_hits": float(sum(r.source == "cache" for r in results)),
        "fallbacks": float(sum(r.source == "fallback" for r in results)),
        "prompt_tokens": float(sum(r.prompt_tokens for r in results)),
        "completion_tokens": float(sum(r.completion_tokens for r in results)),
        "latency_mean": sum(latencies) / len(latencies) if latencies else 0.0,
        "latency_max": max(latencies, default=0.0),
        "retry_wait": sum(r.retry_wait for r in results),
    }
    for fault in FAULTS:
        out[f"fallback/{fault}"] = float(sum(r.fault == fault for r in results))
    return out
