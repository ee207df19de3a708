"""The import path of the loss before it became a package: see ``pathvlm_lightning.grpo.losses``."""

from pathvlm_lightning.grpo.losses import GRPOLoss, LossStats, PolicyLoss, StepTotals, sum_stats

GRPOLossStats = LossStats  # the old name of the statistics

__all__ = ["GRPOLoss", "GRPOLossStats", "LossStats", "PolicyLoss", "StepTotals", "sum_stats"]
