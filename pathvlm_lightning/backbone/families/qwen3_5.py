"""Qwen3.5: natively multimodal, hybrid decoder (Gated DeltaNet linear attention + full attention).

The vision side is Qwen3-VL's without DeepStack. The decoder's ``layer_types`` interleave
``linear_attention`` layers, whose cache is a causal-convolution window and a recurrent state per
row, with ``full_attention`` layers holding keys/values.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3_5Config, Qwen3_5ForConditionalGeneration

from pathvlm_lightning.backbone.families.base import Family, TwinSize, special_ids, vision_ids
from pathvlm_lightning.backbone.families.qwen3_vl import TinyQwen3VLProcessor


class Qwen3_5(Family):
    model_type = "qwen3_5"
    model_class = Qwen3_5ForConditionalGeneration
    processor_class = TinyQwen3VLProcessor
    patch_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def twin_config(self, tokenizer: Any, size: TwinSize) -> PretrainedConfig:
        ids = special_ids(tokenizer)
        head_dim = 2 * size.hidden // size.heads  # Qwen3.5 attention heads are wider than hidden / heads
        text_config = {
            "vocab_size": len(tokenizer),
            "hidden_size": size.hidden,
            "intermediate_size": size.ffn,
            "num_hidden_layers": size.layers,
            "layer_types": ["linear_attention"] * (size.layers - 1) + ["full_attention"],
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "head_dim": head_dim,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": head_dim // 2,
            "linear_value_head_dim": head_dim // 2,
            "linear_num_key_heads": size.kv_heads,
            "linear_num_value_heads": size.heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,  # rotary on a quarter of each head: 16 of 64 dims
                "mrope_section": [3, 3, 2],  # Qwen3.5: 11/11/10 of 32
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
            "num_position_embeddings": 256,
            "patch_size": self.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen3_5Config(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **vision_ids(ids)
        )
