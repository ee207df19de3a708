"""Scoring a prompt's G completions in one sequence ``[prompt, c_1, ..., c_G]``, attended as prompt + G blocks.

The idea of Prefix Grouper (arXiv 2506.05433): instead of G copies of ``prompt + c_k``, each
prompt becomes one sequence holding the prompt once and its G completions after it. Every
completion token sees the real prompt tokens and its own earlier tokens only, and the completions'
rotary positions all continue where the prompt ends, so each token gets exactly the attention
inputs it would get in its own copy: log-probs and gradients equal the copies up to float rounding,
while the vision tower and every decoder layer run over the prompt once. It is one ordinary root
forward, with no cache carried between forwards, so it also runs under FSDP2 (the root's hooks
gather and reshard as usual) and under activation checkpointing (the recomputed layers get the
same layout and positions).

Attention (``backbone/grouped_attention.py``): the prompt attends to itself once, and the G blocks
attend over [prompt, own past] (two SDPA calls per prompt on CUDA, three flash calls on CPU), with no
[S, S] tensor (S = P + G (L-1)): query-key pairs ~ P^2 / 2 + G (L-1) (P + L/2), against G (P + L)^2 / 2
for G copies. The projections and MLPs, which dominate a large model, see P + G (L-1) tokens instead of
G (P + L).
It uses SDPA whatever attention the model was loaded with (the vision tower keeps its own), so
:func:`can_group` still names the backends this path is chosen for.

``dense_mask=True`` runs the former path, one dense [B, 1, S, S] block mask
(:func:`~pathvlm_lightning.backbone.sequences.grouped_attention_mask`) handed to the model's own
attention. It is kept only as the measured baseline of ``benchmarks/prefix_vs_copies.py`` and of
the test that no S x S tensor is allocated; ``Backbone`` never takes it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.families import family_of
from pathvlm_lightning.backbone.grouped_attention import LAYOUT_KWARG, GroupLayout, grouped_attention_installed
from pathvlm_lightning.backbone.logprobs import final_hidden_states
from pathvlm_lightning.backbone.sequences import grouped_attention_mask, grouped_positions, grouped_token_index

GROUPED_ATTENTION = ("sdpa", "eager")  # backends sharing_mode groups for (the grouped attention itself is SDPA)


def can_group(model: PreTrainedModel) -> bool:
    """Whether ``sharing_mode`` may choose the grouped path for this attention backend (``sdpa``, ``eager``)."""
    return model.config.get_text_config()._attn_implementation in GROUPED_ATTENTION


def grouped_hidden_states(
    model: PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
    fed_completions: torch.Tensor,
    num_generations: int,
    *,
    dense_mask: bool = False,
) -> torch.Tensor:
    """Final hidden states [B*G, L, H] whose row ``r``, position ``j`` predicts completion token ``j`` of row ``r``.

    ``inputs`` are the B left-padded prompts (``input_ids``/``attention_mask`` [B, P], pixels,
    grids, ``mm_token_type_ids``); ``fed_completions`` [B*G, L] the ids to feed (vision ids already
    replaced), rows ``i*G .. i*G+G-1`` answering prompt ``i``. The last completion token is never
    fed: nothing is predicted from it. Positions after a completion's EOS are fed as they are;
    no real token attends to them. ``dense_mask``: the former [B, 1, S, S] mask path (see above).
    """
    g = num_generations
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]  # [B, P]
    batch, prompt_length = prompt_ids.shape
    length = fed_completions.shape[1]
    fed = length - 1
    blocks = fed_completions[:, :fed].reshape(batch, g * fed)  # [B, G*(L-1)]: prompt i's G blocks in a row
    arguments = {
        "input_ids": torch.cat([prompt_ids, blocks], dim=1),  # [B, S]
        "position_ids": grouped_positions(prompt_positions(model, inputs), g, fed),  # [3, B, S]
        "pixel_values": inputs.get("pixel_values"),
        "image_grid_thw": inputs.get("image_grid_thw"),
        "logits_to_keep": 1,  # the vocabulary projection is the caller's (backbone/logprobs.py)
        "output_hidden_states": True,
        "use_cache": False,
    }
    if dense_mask:
        outputs = model(attention_mask=_dense_mask(model, prompt_mask, g, fed), **arguments)
    else:
        family = family_of(model)
        attention = [layer.self_attn for layer in family.decoder_layers(model)]
        with grouped_attention_installed(model, attention):
            outputs = model(**arguments, **{LAYOUT_KWARG: GroupLayout.of(prompt_mask, g, fed)})
    hidden = final_hidden_states(outputs)  # [B, S, H]
    index = grouped_token_index(prompt_length, g, length).to(hidden.device)  # [G, L]
    return hidden[:, index].reshape(batch * g, length, hidden.shape[-1])  # [B*G, L, H]


def _dense_mask(model: PreTrainedModel, prompt_mask: torch.Tensor, g: int, fed: int) -> torch.Tensor:
    """The former path's [B, 1, S, S] mask: bool for sdpa, additive for eager."""
    mask = grouped_attention_mask(prompt_mask, g, fed)  # [B, 1, S, S] bool
    if model.config.get_text_config()._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def prompt_positions(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The rotary positions [3, B, P] the model gives the prompts in a full forward.

    With images: the model's own 3-D rope index (padding skipped, image tokens on a grid). Text
    only: Qwen-VL's plain ``0 .. P-1`` on all three axes, padding included, which is what its
    forward uses when no grid is given.
    """
    input_ids = inputs["input_ids"]  # [B, P]
    if inputs.get("image_grid_thw") is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return positions

