"""Model families the backbone supports, detected from a checkpoint's ``config.model_type``.

Adding one: a module here with a :class:`~pathvlm_lightning.backbone.families.base.Family`
subclass (classes, layout, what it does differently), registered in ``FAMILIES``, and its embedded
twin name in ``pathvlm_lightning.backbone.twins.TWINS``.
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from pathvlm_lightning.backbone.families.base import Family, TwinSize
from pathvlm_lightning.backbone.families.qwen2_5_vl import Qwen2_5_VL
from pathvlm_lightning.backbone.families.qwen2_vl import Qwen2_VL
from pathvlm_lightning.backbone.families.qwen3_5 import Qwen3_5
from pathvlm_lightning.backbone.families.qwen3_vl import Qwen3_VL

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Qwen2_VL(), Qwen2_5_VL(), Qwen3_VL(), Qwen3_5())}


def family_for_config(config: PretrainedConfig, source: str = "the model") -> Family:
    """The adapter for ``config.model_type``; a clear error for a family without one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source} has model_type {model_type!r}; supported families are {sorted(FAMILIES)} "
            "(see README 'Model families' for adding one)"
        )
    return FAMILIES[model_type]


def family_of(model: PreTrainedModel) -> Family:
    """The adapter of a (possibly peft-wrapped or FSDP2-sharded) transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_for_config(inner.config, type(inner).__name__)


__all__ = ["FAMILIES", "Family", "TwinSize", "family_for_config", "family_of"]
