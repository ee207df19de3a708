"""LightningModules: the step math and its logging, nothing else."""

from pathvlm_lightning.modules.grpo import GRPOModule
from pathvlm_lightning.modules.schedules import WarmupCosineLR
from pathvlm_lightning.modules.sft import SFTModule

__all__ = ["GRPOModule", "SFTModule", "WarmupCosineLR"]
