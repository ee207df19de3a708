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

from pathvlm_lightning.backbone.families.base import (
    Family,
    TwinSize,
    mrope_section,
    special_ids,
    twin_text_config,
    vision_ids,
)
from pathvlm_lightning.backbone.families.qwen import CHATML_TEMPLATE, QWEN_SPECIAL_TOKENS
from pathvlm_lightning.backbone.vocab import QWEN2_PATTERN, VocabSpec, packaged_ranks

# Qwen3's additions after Qwen2.5's 22 specials (151643..151664); the reasoning tags are plain text
# tokens (``special: false`` in Qwen3's tokenizer_config), so decoding keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


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

    def vocab_spec(self) -> VocabSpec:
        """Qwen2.5's ranks and specials plus Qwen3's four added tokens at 151665..151668; 151,936 rows.

        The chat template is the embedded one (Qwen3-VL's own inserts no default system turn either).
        """
        added = [(token, True) for token in QWEN_SPECIAL_TOKENS] + list(QWEN3_ADDED_TOKENS)
        return VocabSpec(
            ranks_file=packaged_ranks("qwen.tiktoken"),
            added_tokens=tuple((151643 + i, token, special) for i, (token, special) in enumerate(added)),
            pattern=QWEN2_PATTERN,
            chat_template=CHATML_TEMPLATE,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            vocab_size=151936,
        )

    def select_images(self, features: BaseModelOutputWithPooling, order: Sequence[int]) -> BaseModelOutputWithPooling:
        """Merged tokens and every DeepStack layer's features, each listed in ``order``."""
        selected = super().select_images(features, order)
        selected.deepstack_features = [[layer[i] for i in order] for layer in features.deepstack_features]
        return selected

    def twin_config(self, tokenizer: Any, size: TwinSize, vocab_size: int) -> PretrainedConfig:
        ids = special_ids(tokenizer)
        head_dim = size.hidden // size.heads
        rope = {"mrope_section": mrope_section(head_dim, time_share=3), "mrope_interleaved": True}  # 24/20/20 of 64
        text_config = twin_text_config(size, vocab_size, ids, rope, head_dim=head_dim)
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
