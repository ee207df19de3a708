"""Scoring G completions per prompt without paying for the prompt G times.

The G completions of a GRPO group share one prompt: the same tokens and the same images. Scoring
them as G separate sequences runs the vision tower and every decoder layer over the prompt G times,
and the prompt is most of each sequence (an image alone is 256 tokens at 448x448). Two ways to pay
once, both giving what the G copies give up to float rounding:

- ``shared_prompt_hidden``: the prompt goes through the model once (its images encoded once), its
  key/value cache is repeated G times, and the completions run against it. In backward, gradients
  reach the prompt's computation once, summed over its G completions, which is the sum the G copies
  would have produced.
- ``expanded_image_features``: only the images are encoded once and their features are handed to
  the G copies (``mm_encoder_outputs``); the prompt tokens still run G times. For when the cache
  cannot be reused: activation checkpointing drops caches in a training forward.

Both need the transformers 5.x model API (``cache``, ``mm_encoder_outputs``); :func:`sharing_mode`
says which one applies. What differs between families (repeating the cache, DeepStack features,
positions after the images) is asked of the model's :class:`~pathvlm_lightning.backbone.families.Family`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.families import Family
from pathvlm_lightning.backbone.logprobs import final_hidden_states
from pathvlm_lightning.backbone.sequences import expanded_image_order, images_per_row

SharingMode = Literal["prompt", "images", "none"]


def sharing_mode(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], sharded: bool) -> SharingMode:
    """How much of a prompt ``token_logprobs`` can compute once for its G completions.

    ``none`` for text-only prompts (their positions follow another rule; pathology prompts always
    carry an image), FSDP2-sharded models (the vision tower would run outside the sharded root's
    forward, and two root forwards per backward are untested there) and transformers without the
    5.x arguments; ``images`` while activation checkpointing would drop the cache; else ``prompt``.
    """
    accepted = inspect.signature(model.forward).parameters
    if inputs.get("pixel_values") is None or sharded or not {"cache", "mm_encoder_outputs"} <= set(accepted):
        return "none"
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointing and model.training and torch.is_grad_enabled():
        return "images"
    return "prompt"


def shared_prompt_hidden(
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
    fed: nothing is predicted from it. The vocabulary projection is left to the caller
    (``backbone/logprobs.py``); each forward projects one position only (``logits_to_keep=1``).
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
