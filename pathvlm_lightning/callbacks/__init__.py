"""Lightning callbacks: the GRPO parts GRPOModule is given (the rollout's sampler, the rewards, the
reference), export and progress lines. Every packaged reward callback and their base class live in
``callbacks/rewards.py``; the pure scoring they adapt lives in ``pathvlm_lightning.rewards``."""

from pathvlm_lightning.callbacks.export import ExportCallback
from pathvlm_lightning.callbacks.progress import EpochProgressBar, ProgressLog
from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import (
    AccuracyReward,
    FormatReward,
    ProcessReward,
    RewardCallback,
    RubricProcessReward,
    TruthProcessReward,
)
from pathvlm_lightning.callbacks.sampler import RolloutCallback

__all__ = [
    "AccuracyReward",
    "EpochProgressBar",
    "ExportCallback",
    "FormatReward",
    "ProcessReward",
    "ProgressLog",
    "ReferenceModelCallback",
    "RewardCallback",
    "RolloutCallback",
    "RubricProcessReward",
    "TruthProcessReward",
]
