"""Decoding: each prompt pre-filled once, its cache repeated for its G completions, then token by token.

transformers' ``generate(num_return_sequences=G)`` repeats every prompt G times before the first
forward: the prompt's P positions go through the decoder G times and its key/value cache is held G
times. Here the B prompts (images included) go through the model once; the family repeats the
cache G times along the batch (``Family.repeat_cache_for_decoding``: keys/values, and Qwen3.5's
convolution windows and recurrent states), and only the completions are decoded per row. The
logits of the prompt's last position are repeated too, so every row draws its first token from
the same distribution.

Positions follow the rule transformers applies while generating: a new token's rotary position is
the number of attended tokens before it plus the prompt's rope delta (``Family.continuation_positions``;
0 for text-only prompts, whose prompt positions count attended tokens). Greedy output is therefore
the token-for-token output of ``generate`` (``tests/test_generation.py``, every family).

Each step chooses with a :class:`~pathvlm_lightning.backbone.sampling.SamplingRule` and records the
log-prob of the chosen token; rows that have ended get the pad id (log-prob 0), and decoding stops
when every row has ended or after ``max_new_tokens``. The rule works in one float32 ``[2, N, V]``
buffer allocated before the loop, and on CPU the first call pins glibc's mmap threshold for the
process (``backbone/allocator.py``): both keep the heap from fragmenting as the cache grows.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.allocator import pin_mmap_threshold
from pathvlm_lightning.backbone.families import Family
from pathvlm_lightning.backbone.sampling import SamplingRule


class Generated(NamedTuple):
    """Completions and the sampler's log-probs of their tokens."""

    ids: torch.Tensor  # [N, L] long; the pad id after a row's first EOS
    logprobs: torch.Tensor  # [N, L] float32 log_softmax(logits / T) at each id; 0 after the first EOS


@torch.no_grad()
def decode(
    family: Family,
    model: PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
    rule: SamplingRule,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    fan_out: int = 1,
) -> Generated:
    """Decode ``fan_out`` completions for each of the prompts ``inputs`` -> [B * fan_out, L], L <= max_new_tokens.

    ``inputs``: the processor's tensors for B left-padded prompts on the model's device, with
    ``mm_token_type_ids``. Rows ``i*fan_out .. i*fan_out+fan_out-1`` answer prompt ``i``.
    """
    cache_name = _cache_argument(model)
    prompt_mask = inputs["attention_mask"]  # [B, P]
    if prompt_mask.device.type == "cpu":
        pin_mmap_threshold()  # once per process; why, and the opt-out: backbone/allocator.py
    has_vision = any(inputs.get(key) is not None for key in ("image_grid_thw", "video_grid_thw"))
    prefill = dict(inputs)
    if not has_vision:  # the model itself would number padded positions too; generate counts attended ones
        prefill["position_ids"] = _text_positions(prompt_mask.cumsum(dim=1) - 1).masked_fill(prompt_mask == 0, 0)
    out = model(**prefill, use_cache=True, logits_to_keep=1)
    cache, logits = getattr(out, cache_name), out.logits[:, -1]  # logits [B, V]
    if fan_out > 1:
        family.repeat_cache_for_decoding(cache, fan_out)  # [B, ...] -> [B*G, ...]
        logits = logits.repeat_interleave(fan_out, dim=0)  # [B*G, V]
        prompt_mask = prompt_mask.repeat_interleave(fan_out, dim=0)  # [B*G, P]
    rows = logits.shape[0]
    attended = prompt_mask.sum(dim=1, keepdim=True)  # [N, 1] prompt tokens each row attends to
    mask = prompt_mask
    unfinished = torch.ones(rows, dtype=torch.bool, device=logits.device)
    eos = torch.tensor(rule.eos_token_ids, device=logits.device)
    scratch = logits.new_empty((2, *logits.shape), dtype=torch.float32)  # [2, N, V], the rule's buffers, every step
    ids, logprobs = [], []
    for step in range(max_new_tokens):
        token, logprob = rule.next_tokens(logits, step, scratch)  # [N], [N]
        ids.append(token.masked_fill(~unfinished, pad_token_id))
        logprobs.append(logprob.masked_fill(~unfinished, 0.0))
        unfinished &= ~torch.isin(ids[-1], eos)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)  # [N, P + step + 1]
        text = attended + step  # [N, 1] attended tokens before the one fed now
        positions = family.continuation_positions(model, text, fan_out) if has_vision else _text_positions(text)
        out = model(
            input_ids=ids[-1][:, None],
            attention_mask=mask,
            position_ids=positions,  # [3, N, 1]
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        )
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
    return Generated(torch.stack(ids, dim=1), torch.stack(logprobs, dim=1))


def decode_completions(processor: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each completion ``[N, L]`` up to its first EOS (``mask``), special tokens removed."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids, mask)]
    return processor.batch_decode(rows, skip_special_tokens=True)


def _text_positions(positions: torch.Tensor) -> torch.Tensor:
    """Text rotary positions [N, L] as the three equal M-RoPE rows [3, N, L]."""
    return positions.unsqueeze(0).expand(3, -1, -1)


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward's cache argument and output field: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
