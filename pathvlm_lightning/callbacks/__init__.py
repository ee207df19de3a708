"""Lightning callbacks: the GRPO chain (rollout, rewards, reference), export and progress lines."""

from pathvlm_lightning.callbacks.export import ExportCallback
from pathvlm_lightning.callbacks.process_reward import ProcessReward, RubricProcessReward
from pathvlm_lightning.callbacks.progress import EpochProgressBar, ProgressLog
from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.reward import RewardCallback
from pathvlm_lightning.callbacks.rewards import AccuracyReward, FormatReward, TruthProcessReward
from pathvlm_lightning.callbacks.rollout import RolloutCallback

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
