"""Qwen3-VL: 16-pixel patches, learned vision position grid, interleaved M-RoPE and DeepStack.

DeepStack: besides the merged image tokens fed at the input, ``deepstack_visual_indexes`` vision
blocks each emit features that are added to the image positions of the first decoder layers. Image
features computed once must therefore carry those per-layer lists too, in the same image order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pathvlm_lightning.backbone.families.base import Family, TwinSize, mrope_section, special_ids, vision_ids


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor (also Qwen3.5's) without its video processor (torchvision-only in 5.x)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3_VL(Family):
    model_type = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    processor_class = TinyQwen3VLProcessor
    patch_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def select_images(self, features: BaseModelOutputWithPooling, order: Sequence[int]) -> BaseModelOutputWithPooling:
        """Merged tokens and every DeepStack layer's features, each listed in ``order``."""
        selected = super().select_images(features, order)
        selected.deepstack_features = [[layer[i] for i in order] for layer in features.deepstack_features]
        return selected

    def twin_config(self, tokenizer: Any, size: TwinSize) -> PretrainedConfig:
        ids = special_ids(tokenizer)
        head_dim = size.hidden // size.heads
        text_config = {
            "vocab_size": len(tokenizer),
            "hidden_size": size.hidden,
            "intermediate_size": size.ffn,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section(head_dim, time_share=3),  # Qwen3-VL: 24/20/20 of 64
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["pad"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
        }
        vision_config = {
            "depth": size.v_depth,
            "hidden_size": size.v_hidden,
            "intermediate_size": 2 * size.v_hidden,
            "num_heads": 4,
            "out_hidden_size": size.hidden,
            "num_position_embeddings": 256,  # a 16 x 16 learned grid, resampled to each image
            "deepstack_visual_indexes": [0],  # block 0's features go to decoder layer 0
            "patch_size": self.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen3VLConfig(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **vision_ids(ids)
        )
