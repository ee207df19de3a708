"""Qwen2.5-VL: the base layout (windowed vision blocks, key/value cache, flat image features)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen2_5_VLForConditionalGeneration

from pathvlm_lightning.backbone.families.base import Family, TwinSize
from pathvlm_lightning.backbone.tiny import TinyQwenVLProcessor, build_tiny_config
from pathvlm_lightning.backbone.vocab import VocabSpec, qwen2_5_vl_spec


class Qwen2_5_VL(Family):
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = TinyQwenVLProcessor

    def twin_config(self, tokenizer: Any, size: TwinSize, vocab_size: int) -> PretrainedConfig:
        """``embedded-tiny``'s config (``tiny.build_tiny_config``); only the tiny size exists there."""
        if size != TwinSize():
            raise ValueError(f"the Qwen2.5-VL twin comes in the embedded-tiny size only, not {size}")
        return build_tiny_config(tokenizer, "tiny", vocab_size)

    def vocab_spec(self) -> VocabSpec:
        return qwen2_5_vl_spec()
