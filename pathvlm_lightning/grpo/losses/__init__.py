"""Policy losses, each a class named by ``class_path`` in ``model.init_args.loss`` with one ``forward``
signature (``base.py``): GRPO/DAPO/Dr. GRPO (``grpo.py``), GSPO (``gspo.py``), CISPO (``cispo.py``),
SAPO (``sapo.py``)."""

from pathvlm_lightning.grpo.losses.base import (
    AGGREGATIONS,
    Aggregation,
    LossStats,
    PolicyLoss,
    PolicyTerms,
    StepTotals,
    sum_stats,
)
from pathvlm_lightning.grpo.losses.cispo import CISPOLoss
from pathvlm_lightning.grpo.losses.grpo import GRPOLoss
from pathvlm_lightning.grpo.losses.gspo import GSPOLoss
from pathvlm_lightning.grpo.losses.sapo import SAPOLoss

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "CISPOLoss",
    "GRPOLoss",
    "GSPOLoss",
    "LossStats",
    "PolicyLoss",
    "PolicyTerms",
    "SAPOLoss",
    "StepTotals",
    "sum_stats",
]
