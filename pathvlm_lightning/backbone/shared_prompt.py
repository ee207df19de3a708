"""Which way ``Backbone.token_logprobs`` scores G completions per prompt without paying for the prompt G times.

The G completions of a GRPO group share one prompt: the same tokens and the same images. Scoring
them as G separate sequences runs the vision tower and every decoder layer over the prompt G times,
and the prompt is most of each sequence (an image alone is 256 tokens at 448x448). Each way below
gives what the G copies give, up to float rounding (gradients reaching the prompt's computation
arrive once, summed over its G completions, which is the sum the copies would produce):

- ``cache`` (:func:`cached_prompt_hidden_states`): the prompt goes through the model once, its
  key/value cache is repeated G times, and the completions run against it in a second forward
  (the cache argument is ``cache`` in transformers 5.2x, ``past_key_values`` in 5.17).
  Works with any attention backend (flash-attention included), but only in one process (two root
  forwards per backward are not what FSDP2's hooks expect), without activation checkpointing
  (which drops caches in a training forward) and for image prompts (it continues positions by the
  prompt's rope delta).
- ``grouped`` (``backbone/prefix_group.py``): one sequence per prompt, ``[prompt, c_1, ..., c_G]``,
  in one ordinary forward whose attention (``backbone/grouped_attention.py``) runs the prompt's
  self-attention once and each completion over [prompt keys/values, its own] (flash calls, see
  there) and no [S, S] tensor (S = P + G x (L-1)). Needs the model loaded with ``sdpa`` or
  ``eager`` (the grouped attention itself is SDPA); works sharded (FSDP2), under activation
  checkpointing and for text-only prompts. Measured at a 7B attention geometry
  (``benchmarks/prefix_vs_copies.py --paper-shape``, P = 1,301, G = 8, CPU, with the split flash
  calls of ``grouped_attention.py``): grouped took 0.89x ``cache``'s time at 1,024 completion tokens
  and 0.58x at 256, with 1.05x and 1.11x its memory. ``cache`` is still chosen wherever it can run
  (one process, no checkpointing); which one wins on a GPU is not measured yet.
- ``images`` (:func:`expanded_image_features`): only the images are encoded once, their features
  handed to the G copies (``mm_encoder_outputs``, transformers 5.2x only); the prompt tokens still
  run G times. For flash-attention under activation checkpointing.
- ``none``: G copies.

A mode slower than the configuration's fast one comes with its reason and cost
(:attr:`Sharing.fallback`), which ``Backbone.sharing_mode`` says once at WARNING.

What differs between families (repeating the cache, DeepStack features, positions after the
images, whether the grouped attention can keep completions apart) is asked of the model's
:class:`~pathvlm_lightning.backbone.families.Family`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.families import Family
from pathvlm_lightning.backbone.logprobs import final_hidden_states
from pathvlm_lightning.backbone.prefix_group import can_group
from pathvlm_lightning.backbone.sequences import expanded_image_order, images_per_row

SharingMode = Literal["grouped", "cache", "images", "none"]
SHARING_MODE_CODES: dict[SharingMode, int] = {"none": 0, "images": 1, "grouped": 2, "cache": 3}
"""The number logged as ``rollout/sharing_mode``: 0 ``none`` (G copies), 1 ``images`` (images encoded
once, prompt tokens G times), 2 ``grouped``, 3 ``cache``."""
CACHE_ARGUMENTS = ("cache", "past_key_values")
"""What ``forward`` calls a carried key/value cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
_COSTS: dict[SharingMode, str] = {
    "images": "the prompt tokens run through every decoder layer G times (only the images are encoded once)",
    "none": "each prompt runs as G full copies (vision tower and every decoder layer G times)",
}


@dataclass(frozen=True)
class Sharing:
    """The way chosen for one ``token_logprobs`` call and, when it is slower than what the configuration
    allows, why (``fallback``: the reason and its cost, the text of a warning); ``None`` when it is the fast one."""

    mode: SharingMode
    fallback: str | None = None


def cache_argument(model: PreTrainedModel) -> str | None:
    """The name ``model.forward`` takes a key/value cache under, or ``None`` when it takes none."""
    accepted = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in accepted), None)


def choose_sharing(
    family: Family, model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], *, share: bool, sharded: bool
) -> Sharing:
    """How ``token_logprobs`` computes a prompt once for its G completions (see the module docstring).

    The fast way for the configuration: ``cache`` for image prompts in one process unless activation
    checkpointing would drop the cache (a training forward with gradients), else ``grouped``.
    Each mode needs only what it uses: ``cache`` a cache argument (``cache`` or transformers 5.17's
    ``past_key_values``), ``grouped`` an attention backend that takes a block mask (``sdpa``,
    ``eager``) and a family whose layers all attend, ``images`` the ``mm_encoder_outputs`` argument
    (transformers 5.2x) and one process. Where the fast way cannot run, the next one that can is
    chosen, ``none`` (G copies) last, and :attr:`Sharing.fallback` says why and what it costs.
    ``share=False`` is ``none`` by choice, not a fallback.
    """
    if not share:
        return Sharing("none")
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    drops_cache = checkpointing and model.training and torch.is_grad_enabled()
    # Without gradients nothing is checkpointed, and transformers >= 5.25 keeps the cache then; 5.17
    # drops it in every training-mode forward under checkpointing (a reference pass, say).
    drops_without_grad = checkpointing and model.training and not torch.is_grad_enabled() and not _keeps_cache()
    has_images = inputs.get("pixel_values") is not None
    reasons: list[str] = []
    if has_images and not sharded and not drops_cache:
        if cache_argument(model) is None:
            names = " or ".join(CACHE_ARGUMENTS)
            reasons.append(f"{_forward_name(model)} takes no key/value cache argument ({names})")
        elif drops_without_grad:
            reasons.append(
                f"transformers {transformers.__version__} drops the cache of a training-mode forward under "
                "activation checkpointing even without gradients (5.25 keeps it)"
            )
        else:
            return Sharing("cache")
    backend = model.config.get_text_config()._attn_implementation
    if can_group(model) and family.groups_prompts:
        cost = (
            "attention runs over the grouped sequence [prompt, c_1, ..., c_G] instead of each completion "
            "over the cached prompt"
        )
        return Sharing("grouped", _fallback("grouped", reasons, cost))
    if not can_group(model):
        reasons.append(f"the attention backend {backend!r} takes no block mask (grouping needs sdpa or eager)")
    if not family.groups_prompts:
        reasons.append(
            f"{type(family).__name__} cannot group a prompt's completions in one sequence (some of its layers "
            "do not attend, so no block mask keeps completions apart)"
        )
    if has_images and not sharded:
        if "mm_encoder_outputs" in inspect.signature(model.forward).parameters:
            return Sharing("images", _fallback("images", [*reasons, _context(sharded, drops_cache, has_images)]))
        reasons.append(f"{_forward_name(model)} takes no mm_encoder_outputs (images cannot be shared either)")
    return Sharing("none", _fallback("none", [*reasons, _context(sharded, drops_cache, has_images)]))


def _keeps_cache() -> bool:
    """Whether transformers keeps a cache in a gradient-free training-mode forward under checkpointing."""
    return Version(transformers.__version__).release[:2] >= (5, 25)


def _forward_name(model: PreTrainedModel) -> str:
    return f"transformers {transformers.__version__}'s {type(model).__name__}.forward"


def _context(sharded: bool, drops_cache: bool, has_images: bool) -> str:
    """Why the cache was not the way (the configuration's own reason, said alongside the fallback's)."""
    if sharded:
        return "under FSDP2 the prompt's cache cannot be carried between two root forwards"
    if drops_cache:
        return "activation checkpointing drops the prompt's cache in a training forward"
    if not has_images:
        return "text-only prompts are shared by grouping only"
    return ""


def _fallback(mode: SharingMode, reasons: list[str], cost: str | None = None) -> str | None:
    reasons = [r for r in reasons if r]
    if not reasons:
        return None
    cost = cost or _COSTS[mode]
    return (
        f"token_logprobs shares prompts as {mode!r}, not the faster way for this configuration: "
        f"{'; '.join(reasons)}. Cost: {cost}."
    )


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
    argument = cache_argument(model)  # ``cache`` (5.2x) or ``past_key_values`` (5.17), on the output too
    cache = getattr(prompt, argument)
    family.repeat_cache(cache, g)  # every layer's state [B, ...] -> [B*G, ...] (keys/values [B*G, heads, P, d])
    prompt_mask = inputs["attention_mask"].repeat_interleave(g, dim=0)  # [B*G, P]
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)[:, :-1]  # [B*G, P+L-1]
    positions = (mask.cumsum(dim=1) - 1)[:, prompt_mask.shape[1] :]  # [B*G, L-1]: attended tokens so far - 1
    rest = model(
        input_ids=fed_completions[:, :-1],
        attention_mask=mask,
        position_ids=family.continuation_positions(model, positions, g),  # [3, B*G, L-1]
        **{argument: cache},
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
