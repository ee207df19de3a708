"""The cross-modal process reward's judge: request building, reply parsing, cache and client.

Free of Lightning; :mod:`pathvlm_lightning.callbacks.rewards` (``ProcessReward``) adapts it to training.
"""

from pathvlm_lightning.rewards.judge.attempt import retry_after_seconds
from pathvlm_lightning.rewards.judge.budget import JudgeBudget
from pathvlm_lightning.rewards.judge.cache import JudgeCache, cache_key
from pathvlm_lightning.rewards.judge.client import JudgeAuthError, JudgeClient
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.counters import FAULTS, JudgeResult, summarize
from pathvlm_lightning.rewards.judge.parse import (
    UNPARSEABLE,
    JudgeScores,
    UnparseableReply,
    fallback_scores,
    parse_reply,
)
from pathvlm_lightning.rewards.judge.request import RUBRIC, RUBRIC_VERSION, JudgeItem, build_judge_messages

__all__ = [
    "FAULTS",
    "RUBRIC",
    "RUBRIC_VERSION",
    "UNPARSEABLE",
    "JudgeAuthError",
    "JudgeBudget",
    "JudgeCache",
    "JudgeClient",
    "JudgeConfig",
    "JudgeItem",
    "JudgeResult",
    "JudgeScores",
    "UnparseableReply",
    "build_judge_messages",
    "cache_key",
    "fallback_scores",
    "parse_reply",
    "retry_after_seconds",
    "summarize",
]
