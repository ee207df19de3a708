"""Which way ``Backbone.token_logprobs`` scores G completions per prompt without paying for the prompt G times.

The G completions of a GRPO group share one prompt: the same tokens and the same images. Scoring
them as G separate sequences runs the vision tower and every decoder layer over the prompt G times,
and the prompt is most of each sequence (an image alone is 256 tokens at 448x448). Each way below
gives what the G copies give, up to float rounding (gradients reaching the prompt's computation
arrive once, summed over its G completions, which is the sum the copies would produce):

- ``cache`` (:func:`cached_prompt_hidden_states`): the prompt goes through the model once, its
  key/value cache is repeated G times, and the completions run against it in a second forward.
  Works with any attention backend (flash-attention included), but only in one process (two root
  forwards per backward are not what FSDP2's hooks expect), without activation checkpointing
  (which drops caches in a training forward) and for image prompts (it continues positions by the
  prompt's rope delta).
- ``grouped`` (``backbone/prefix_group.py``): one sequence per prompt, ``[prompt, c_1, ..., c_G]``,
  with a block attention mask, in one ordinary forward. Needs an attention backend that takes a
  4-D mask (``sdpa``, ``eager``); works sharded (FSDP2), under activation checkpointing and for
  text-only prompts. Its attention runs over the whole [S, S] grouped sequence (S = P + G x (L-1)),
  most of it masked, where ``cache`` attends over [L-1, P+L-1] per completion: on the embedded
  small model (``benchmarks/prefix_vs_copies.py``) the two take the same time at 64 completion
  tokens (grouped with 12-15 % less memory) and grouped takes 1.2-1.5x the time of ``cache`` at
  256, so ``cache`` is chosen wherever it can run.
- ``images`` (:func:`expanded_image_features`): only the images are encoded once, their features
  handed to the G copies (``mm_encoder_outputs``); the prompt tokens still run G times. For
  flash-attention under activation checkpointing.
- ``none``: G copies.

What differs between families (repeating the cache, DeepStack features, positions after the
images, whether a block mask can keep completions apart) is asked of the model's
:class:`~pathvlm_lightning.backbone.families.Family`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.families import Family
from pathvlm_lightning.backbone.logprobs import final_hidden_states
from pathvlm_lightning.backbone.prefix_group import can_group
from pathvlm_lightning.backbone.sequences import expanded_image_order, images_per_row

SharingMode = Literal["grouped", "cache", "images", "none"]


def sharing_mode(
    family: Family, model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], *, share: bool, sharded: bool
) -> SharingMode:
    """How ``token_logprobs`` computes a prompt once for its G completions (see the module docstring).

    ``cache`` for image prompts in one process unless activation checkpointing would drop the cache
    (a training forward with gradients); else ``grouped`` when the attention backend takes a block
    mask (``sdpa``, ``eager``: under FSDP2, with checkpointing, for text-only prompts); else
    (flash-attention) ``images`` under checkpointing in one process and ``none`` otherwise.
    ``share=False`` or transformers without the 5.x arguments: ``none``.
    """
    accepted = inspect.signature(model.forward).parameters
    if not share or not {"cache", "mm_encoder_outputs"} <= set(accepted):
        return "none"
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    drops_cache = checkpointing and model.training and torch.is_grad_enabled()
    single_image_batch = inputs.get("pixel_values") is not None and not sharded
    if single_image_batch and not drops_cache:
        return "cache"
    if can_group(model) and family.groups_prompts:
        return "grouped"
    return "images" if single_image_batch else "none"


def cached_prompt_hidden_states(
    family: Family,
    model: PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
    fed_completions: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
) -> torch.Tensor:
    """Final hidden states [B*G, L, H] whose row ``r``, position ``j`` predicts completion token ``j`` of row ``r``.

    ``inputs`` are the B prompts (``input_ids``/``attention_mask``/``mm_token_type_ids`` [B, P], pixels,
    grids); ``fed_completions`` [B*G, L] the ids to feed (vision ids already replaced) and
    ``completion_mask`` [B*G, L] which of them are attended to. The last completion token is never
    fed: nothing is predicted from it. Each forward projects one position only (``logits_to_keep=1``);
    the vocabulary projection is the caller's (``backbone/logprobs.py``).
    """
    g = num_generations
    prompt = model(**inputs, use_cache=True, logits_to_keep=1, output_hidden_states=True)
    first = final_hidden_states(prompt)[:, -1:].repeat_interleave(g, dim=0)  # [B*G, 1, H]: predicts token 0
    length = fed_completions.shape[1]
    if length == 1:
        return first
    cache = prompt.cache
    family.repeat_cache(cache, g)  # every layer's state [B, ...] -> [B*G, ...] (keys/values [B*G, heads, P, d])
    prompt_mask = inputs["attention_mask"].repeat_interleave(g, dim=0)  # [B*G, P]
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)[:, :-1]  # [B*G, P+L-1]
    positions = (mask.cumsum(dim=1) - 1)[:, prompt_mask.shape[1] :]  # [B*G, L-1]: attended tokens so far - 1
    rest = model(
        input_ids=fed_completions[:, :-1],
        attention_mask=mask,
        position_ids=family.continuation_positions(model, positions, g),  # [3, B*G, L-1]
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    return torch.cat([first, final_hidden_states(rest)], dim=1)  # [B*G, L, H]


def expanded_image_features(
    family: Family, model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], num_generations: int
) -> dict[str, Any]:
    """``mm_encoder_outputs`` for the B*G expanded rows: each of the B prompts' images encoded once.

    Features are listed in the order the expanded rows consume image slots (see
    :func:`~pathvlm_lightning.backbone.sequences.expanded_image_order`).
    """
    grid = inputs["image_grid_thw"]  # [N, 3]
    features = family.encode_images(model, inputs["pixel_values"], grid)  # pooler_output: N x [tokens, H]
    config = model.config
    counts = images_per_row(inputs["input_ids"], grid, config.image_token_id, config.vision_config.spatial_merge_size)
    return {"image": family.select_images(features, expanded_image_order(counts, num_generations))}  # N*G images
