"""What differs between vision-language families, behind one interface the backbone calls.

``Backbone``, the sharding, the shared prompt passes and every caller reach a family's model only
through a :class:`Family`: where its vision tower and decoder layers live, which ids are vision
slots, how image features computed once are handed back, how a prompt's cache is repeated for G
completions and where text after the images sits in rotary positions. The defaults here are the
Qwen2-VL/Qwen2.5-VL layout (``model.model.visual``, ``model.model.language_model.layers``, flat
image features, a key/value cache); a family overrides what it does differently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pathvlm_lightning.backbone.families.qwen import mrope_section  # noqa: F401  (re-exported for the adapters)
from pathvlm_lightning.backbone.vocab import VocabSpec


@dataclass(frozen=True)
class TwinSize:
    """Dimensions of an embedded twin (those of ``embedded-tiny``: ~0.8 M parameters at 1,024 ids)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    v_depth: int = 2
    v_hidden: int = 64


class Family(ABC):
    """One model family: its transformers classes and the places where it differs from the rest."""

    model_type: ClassVar[str]
    """``config.model_type`` of the checkpoints this adapter handles (the detection key)."""
    model_class: ClassVar[type[PreTrainedModel]]
    """The ``...ForConditionalGeneration`` class."""
    processor_class: ClassVar[type[ProcessorMixin]]
    """A processor class that builds and loads without torchvision (no video processor)."""
    patch_size: ClassVar[int] = 14
    """Vision patch side in pixels; one token per ``(2 * patch_size)**2`` pixels after the 2x2 merge."""
    image_mean: ClassVar[tuple[float, float, float]] = (0.48145466, 0.4578275, 0.40821073)
    image_std: ClassVar[tuple[float, float, float]] = (0.26862954, 0.26130258, 0.27577711)
    groups_prompts: ClassVar[bool] = True
    """Whether the grouped attention keeps G completions apart in one grouped sequence
    (``backbone/prefix_group.py``); false where some layers do not attend (linear attention)."""

    # ------------------------------------------------------------------ where things live
    def vision_tower(self, model: PreTrainedModel) -> torch.nn.Module:
        """The whole vision encoder including its patch merger(s): what ``freeze_vision`` freezes."""
        return model.model.visual

    def decoder_layers(self, model: PreTrainedModel) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers (one FSDP2 unit each)."""
        return model.model.language_model.layers

    def vision_blocks(self, model: PreTrainedModel) -> Sequence[torch.nn.Module]:
        """The vision transformer blocks (one FSDP2 unit each)."""
        return model.model.visual.blocks

    def vision_token_ids(self, config: PretrainedConfig, tokenizer: Any) -> tuple[int, ...]:
        """Ids of image/video slots and their delimiters (and ``<|vision_pad|>`` when the tokenizer has it)."""
        ids = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
        vision_pad = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        if isinstance(vision_pad, int) and vision_pad != tokenizer.unk_token_id:
            ids.add(vision_pad)
        return tuple(sorted(i for i in ids if i is not None))

    # ------------------------------------------------------------------ image features
    def encode_images(
        self, model: PreTrainedModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> BaseModelOutputWithPooling:
        """The vision tower's output for N images, ``pooler_output`` split per image (N x [tokens, H])."""
        return model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def select_images(self, features: BaseModelOutputWithPooling, order: Sequence[int]) -> BaseModelOutputWithPooling:
        """The per-image features listed in ``order`` (indices may repeat): what ``mm_encoder_outputs`` takes."""
        return BaseModelOutputWithPooling(pooler_output=[features.pooler_output[i] for i in order])

    # ------------------------------------------------------------------ shared prompt pass
    def repeat_cache(self, cache: Cache, num_generations: int) -> None:
        """Repeat every layer's cached state G times along the batch, in place ([B, ...] -> [B*G, ...])."""
        cache.batch_repeat_interleave(num_generations)

    def repeat_cache_for_decoding(self, cache: Cache, num_generations: int) -> None:
        """Repeat every layer's cached state G times along the batch, in place, for token-by-token
        decoding without gradient (each row's state then keeps growing on its own)."""
        cache.batch_repeat_interleave(num_generations)

    def continuation_positions(
        self, model: PreTrainedModel, text_positions: torch.Tensor, num_generations: int
    ) -> torch.Tensor:
        """Rotary position ids [3, B*G, L] of completions that continue B cached prompts, G rows each.

        ``text_positions`` [B*G, L] count attended tokens so far (minus one). After images, text goes
        on at that count plus its prompt's rope delta (``model.model.rope_deltas`` [B, 1], set by the
        prompt's forward: largest position used + 1 - length), the rule the model applies itself
        to every generated token; text has equal time, height and width positions.
        """
        deltas = model.model.rope_deltas.repeat_interleave(num_generations, dim=0)  # [B*G, 1]
        return (text_positions + deltas).unsqueeze(0).expand(3, -1, -1)

    # ------------------------------------------------------------------ embedded twin
    @abstractmethod
    def twin_config(self, tokenizer: Any, size: TwinSize, vocab_size: int) -> PretrainedConfig:
        """A config for random weights: ``size``, ``vocab_size`` embedding rows, ``tokenizer``'s special ids."""

    @abstractmethod
    def vocab_spec(self) -> VocabSpec:
        """The family's real tokenizer (ranks, special tokens at their published ids, embedding rows)."""


def special_ids(tokenizer: Any) -> dict[str, int]:
    """The ids a twin's config needs, looked up in ``tokenizer`` (eos is the chat turn end)."""
    names = {
        "pad": "<|endoftext|>",
        "eos": "<|im_end|>",
        "image": "<|image_pad|>",
        "video": "<|video_pad|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def vision_ids(ids: dict[str, int]) -> dict[str, int]:
    """The four vision-token keyword arguments every Qwen-VL config takes."""
    return {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
    }


def twin_text_config(
    size: TwinSize, vocab_size: int, ids: dict[str, int], rope: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The text half of a twin's config: ``size``'s widths, ``vocab_size`` rows, ``ids``' special ids
    (:func:`special_ids`), default rotary parameters updated with ``rope``, then ``extra`` keys."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": size.hidden,
        "intermediate_size": size.ffn,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope},
        "bos_token_id": ids["pad"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        **extra,
    }
