"""The vision-language backbone (every family in ``families``): loading, embedded models, generation, log-probs."""

from pathvlm_lightning.backbone.loading import load_processor
from pathvlm_lightning.backbone.lora import LoraOptions
from pathvlm_lightning.backbone.logprobs import chunked_target_logprobs
from pathvlm_lightning.backbone.sequences import completion_mask, pad_after_eos
from pathvlm_lightning.backbone.shared_prompt import SHARING_MODE_CODES
from pathvlm_lightning.backbone.sharding import apply_fully_shard, gathered_for_generation
from pathvlm_lightning.backbone.tiny import (
    TinyQwenVLProcessor,
    build_tiny_model,
    build_tiny_processor,
)
from pathvlm_lightning.backbone.wrapper import Backbone

__all__ = [
    "SHARING_MODE_CODES",
    "Backbone",
    "LoraOptions",
    "TinyQwenVLProcessor",
    "apply_fully_shard",
    "build_tiny_model",
    "build_tiny_processor",
    "chunked_target_logprobs",
    "completion_mask",
    "gathered_for_generation",
    "load_processor",
    "pad_after_eos",
]
