"""Qwen2-VL: Qwen2.5-VL's layout with full-attention vision blocks (``embed_dim`` wide) and no window."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from pathvlm_lightning.backbone.families.base import (
    Family,
    TwinSize,
    mrope_section,
    special_ids,
    twin_text_config,
    vision_ids,
)
from pathvlm_lightning.backbone.vocab import VocabSpec, qwen2_5_vl_spec


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision in transformers 5.x)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_VL(Family):
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    processor_class = TinyQwen2VLProcessor

    def vocab_spec(self) -> VocabSpec:
        """Qwen2-VL's tokenizer is Qwen2.5-VL's: the same ranks, specials and 151,936 rows."""
        return qwen2_5_vl_spec()

    def twin_config(self, tokenizer: Any, size: TwinSize, vocab_size: int) -> PretrainedConfig:
        ids = special_ids(tokenizer)
        head_dim = size.hidden // size.heads
        text_config = twin_text_config(size, vocab_size, ids, {"mrope_section": mrope_section(head_dim)})
        vision_config = {
            "depth": size.v_depth,
            "embed_dim": size.v_hidden,
            "hidden_size": size.hidden,  # Qwen2-VL names the merger's output width hidden_size
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": self.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen2VLConfig(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **vision_ids(ids)
        )
