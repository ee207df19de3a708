"""Attention for a grouped sequence ``[prompt, c_1, ..., c_G]`` that costs what it needs: no [S, S] tensor.

The split of Prefix Grouper (arXiv 2506.05433), written for SDPA: per prompt, the prompt's real
tokens attend causally to each other once, and the G completion blocks attend, as a batch of G, over
``[prompt keys/values, own keys/values]`` with a lower-right causal alignment (token ``j`` of a block
sees the whole prompt and its own tokens ``0..j``). Every call is
a flash kernel: on CUDA the prompt call (``is_causal``) and the completion call (``causal_lower_right``,
a bias object, not a tensor) of ``torch.nn.functional.scaled_dot_product_attention`` reach the flash
or memory-efficient kernels. On CPU, whose flash kernel skips masked tiles only for ``is_causal``,
the completion blocks run as two flash calls merged by their log-sum-exp
(:class:`_SplitBlockAttention`): all G*(L-1) block queries over the prompt's keys with no mask, and
each block causally over its own keys; an explicit lower-right mask would cost G (L-1)(P+L-1)
query-key pairs, the split G (L-1) P + G (L-1)^2 / 2, with the prompt's keys held once. The largest
attention tensors are per prompt [G, heads, L-1, head_dim] and nothing has S x S elements.

Left padding: each prompt's real tokens are a suffix of its row; only that suffix is attended, so
no padding key is ever seen and no padding mask is needed. Padding queries get zeros (their outputs
are never read and never attended). Completions after their EOS are fed as they are; a real token
attends only to earlier tokens of its own block, so nothing after an EOS reaches it.

How it is reached: transformers' attention layers look their function up by
``config._attn_implementation``. :func:`grouped_attention_installed` registers :func:`grouped_attention`
under :data:`NAME`, and forward hooks on each decoder layer's attention switch the text config to
that name for the call when the layer receives the :data:`LAYOUT_KWARG` keyword argument (which
the model forwards from its top-level call to every attention layer). The switch thus happens again
when activation checkpointing recomputes a layer in backward (the recomputed call gets the same
keyword arguments), and never for any other forward. While the grouped forward runs, the text
config carries :data:`NAME` too, so that transformers builds no mask for it (it builds none for an
attention function it does not know).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AttentionInterface, PreTrainedModel

NAME = "pathvlm_grouped"
"""The attention-function name this module registers with transformers."""
LAYOUT_KWARG = "prompt_group"
"""The keyword argument of the model's forward that carries the :class:`GroupLayout`."""
_HOOKED = "_pathvlm_grouped_hooks"
_GQA_IN_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa arrived in 2.5


@dataclass(frozen=True)
class GroupLayout:
    """Where things sit in B grouped sequences of S = P + G * F tokens.

    ``prompt_starts[i]`` is the first real token of prompt row ``i`` (its left padding before it),
    as Python ints so that no layer needs a device sync.
    """

    prompt_length: int
    num_generations: int
    fed_length: int
    prompt_starts: tuple[int, ...]

    @classmethod
    def of(cls, prompt_mask: torch.Tensor, num_generations: int, fed_length: int) -> GroupLayout:
        """The layout of left-padded prompts ``prompt_mask`` [B, P] (1 real, 0 padding).

        >>> GroupLayout.of(torch.tensor([[0, 0, 1], [1, 1, 1]]), num_generations=2, fed_length=4).prompt_starts
        (2, 0)
        """
        length = prompt_mask.shape[1]
        starts = (length - prompt_mask.sum(dim=1)).tolist()  # real tokens are each row's suffix
        return cls(length, num_generations, fed_length, tuple(int(s) for s in starts))


def _sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scale: float | None, lower_right: bool
) -> torch.Tensor:
    """SDPA of query [N, Hq, Lq, d] over key/value [N, Hkv, Lk, d]; causal, aligned at the end when ``lower_right``."""
    repeat = query.shape[1] // key.shape[1]
    on_cpu = query.device.type == "cpu"
    # Key/value heads are repeated where SDPA's own GQA (torch >= 2.5) is missing or slow: the
    # CausalBias kernels on CUDA (flash, memory-efficient) take equal head counts, and on CPU the
    # flash backward with enable_gqa parallelises over batch x key/value heads, which for one prompt
    # with 1 key/value head measured 9x slower (23.8 s vs 2.6 s at P = 1,301, 7 query heads, 2
    # threads; the G completion blocks, a batch of G, measured 0.8x the time of repeated heads).
    if repeat > 1 and (not _GQA_IN_SDPA or lower_right != on_cpu):
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    if lower_right and query.shape[2] != key.shape[2]:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=_lower_right(query, key), dropout_p=dropout, scale=scale, **gqa
        )
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale, **gqa)


def _lower_right(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | CausalBias:
    """Causal aligned at the end, query i of Lq sees keys 0 .. Lk - Lq + i: a CausalBias (no tensor)
    off CPU, where it selects the flash/memory-efficient kernels; on CPU, where torch materialises it
    anyway, the same bool [Lq, Lk] mask built here.

    >>> _lower_right(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 3, 1)).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    lq, lk = query.shape[2], key.shape[2]
    if query.device.type != "cpu":
        return causal_lower_right(lq, lk)
    rows = torch.arange(lq, device=query.device).unsqueeze(1)
    return torch.arange(lk, device=query.device).unsqueeze(0) <= rows + (lk - lq)


def _heads(tensor: torch.Tensor, repeat: int) -> torch.Tensor:
    """Key/value heads repeated ``repeat`` times (the CPU flash op takes equal head counts), contiguous."""
    return (tensor.repeat_interleave(repeat, dim=1) if repeat > 1 else tensor).contiguous()


def _head_sum(grad: torch.Tensor, repeat: int) -> torch.Tensor:
    """The gradient of repeated heads [N, Hkv * repeat, L, d] summed back onto [N, Hkv, L, d]."""
    return grad.unflatten(1, (-1, repeat)).sum(dim=2) if repeat > 1 else grad


class _SplitBlockAttention(torch.autograd.Function):
    """The G completion blocks' attention on CPU as two flash calls merged by their log-sum-exp.

    One call puts all G*F block queries over the prompt's keys with no mask (the prompt's keys and
    values are held once, not G times); the other runs each block causally over its own keys
    (``is_causal``, whose masked tiles the CPU flash kernel skips, which it does not for an explicit
    lower-right mask). With ``m = logaddexp(lse_prompt, lse_own)`` the output is
    ``exp(lse_prompt - m) o_prompt + exp(lse_own - m) o_own``: attention over [prompt, own past].
    Backward runs each call's flash backward with the merged output and log-sum-exp, which is the
    gradient of the merged attention restricted to that call's keys (the softmax is normalised by
    ``m``, and the row term ``sum(dO * O)`` is the merged output's).

    q [G, Hq, F, d], prompt k/v [1, Hkv, P_i, d], own k/v [G, Hkv, F, d] -> [G, Hq, F, d].
    """

    @staticmethod
    def forward(ctx, query, key_prompt, value_prompt, key_own, value_own, scale):
        g, heads, fed, dim = query.shape
        repeat = heads // key_prompt.shape[1]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_prompt, lse_prompt = flash(  # [1, Hq, G*F, d], [1, Hq, G*F]
            _flat(query), _heads(key_prompt, repeat), _heads(value_prompt, repeat), 0.0, False, scale=scale
        )
        out_own, lse_own = flash(  # [G, Hq, F, d], [G, Hq, F]
            query.contiguous(), _heads(key_own, repeat), _heads(value_own, repeat), 0.0, True, scale=scale
        )
        lse_prompt = lse_prompt.view(heads, g, fed).transpose(0, 1)  # [G, Hq, F]
        out_prompt = out_prompt.view(heads, g, fed, dim).transpose(0, 1)  # [G, Hq, F, d]
        lse = torch.logaddexp(lse_prompt, lse_own)  # [G, Hq, F]
        weight_prompt, weight_own = (lse_prompt - lse).exp_().unsqueeze(-1), (lse_own - lse).exp_().unsqueeze(-1)
        out = (weight_prompt * out_prompt + weight_own * out_own).to(query.dtype)  # [G, Hq, F, d]
        # Saved: the inputs as given (views into the layer's own projections, no copies) and the merged
        # output and log-sum-exp; the contiguous and head-repeated copies are made again in backward.
        ctx.save_for_backward(query, key_prompt, value_prompt, key_own, value_own, out, lse)
        ctx.scale, ctx.repeat = scale, repeat
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key_prompt, value_prompt, key_own, value_own, out, lse = ctx.saved_tensors
        g, heads, fed, dim = query.shape
        r, scale = ctx.repeat, ctx.scale
        grad_out = grad_out.to(out.dtype).contiguous()
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        gq_prompt, gk_prompt, gv_prompt = backward(
            _flat(grad_out), _flat(query), _heads(key_prompt, r), _heads(value_prompt, r), _flat(out),
            _flat(lse.unsqueeze(-1)).squeeze(-1), 0.0, False, scale=scale,
        )
        gq_own, gk_own, gv_own = backward(
            grad_out, query.contiguous(), _heads(key_own, r), _heads(value_own, r), out, lse.contiguous(), 0.0, True,
            scale=scale,
        )
        grad_query = gq_own + gq_prompt.view(heads, g, fed, dim).transpose(0, 1)
        grads = (_head_sum(grad, r) for grad in (gk_prompt, gv_prompt, gk_own, gv_own))  # onto the key/value heads
        return (grad_query, *grads, None)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """[G, Hq, F, ...] -> [1, Hq, G*F, ...] contiguous: the G blocks' queries as one sequence for the prompt call."""
    return tensor.transpose(0, 1).reshape(1, tensor.shape[1], tensor.shape[0] * tensor.shape[2], *tensor.shape[3:])


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query [B, Hq, S, d], key/value [B, Hkv, S, d] -> [B, S, Hq, d].

    Reads the :class:`GroupLayout` from ``kwargs[LAYOUT_KWARG]``; ``attention_mask`` is ignored (the
    layout says everything a mask would).
    """
    layout: GroupLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise RuntimeError(f"attention {NAME!r} was called without the {LAYOUT_KWARG!r} layout of the grouped sequence")
    p, g, fed = layout.prompt_length, layout.num_generations, layout.fed_length
    rows = []
    for i, start in enumerate(layout.prompt_starts):
        q_prompt, k_prompt, v_prompt = (t[i : i + 1, :, start:p] for t in (query, key, value))  # [1, H, P_i, d]
        parts = [query.new_zeros(query.shape[1], start, query.shape[3])]  # padding queries: zeros
        parts.append(_sdpa(q_prompt, k_prompt, v_prompt, dropout, scaling, lower_right=False)[0])  # [Hq, P_i, d]
        if fed:
            q_blocks, k_blocks, v_blocks = (  # [G, H, F, d]
                t[i, :, p:].unflatten(1, (g, fed)).transpose(0, 1) for t in (query, key, value)
            )
            if q_blocks.device.type == "cpu" and not (dropout and module.training):
                blocks = _SplitBlockAttention.apply(q_blocks, k_prompt, v_prompt, k_blocks, v_blocks, scaling)
            else:
                k_seen = torch.cat([k_prompt.expand(g, -1, -1, -1), k_blocks], dim=2)  # [G, Hkv, P_i + F, d]
                v_seen = torch.cat([v_prompt.expand(g, -1, -1, -1), v_blocks], dim=2)
                blocks = _sdpa(q_blocks, k_seen, v_seen, dropout, scaling, lower_right=True)  # [G, Hq, F, d]
            parts.append(blocks.transpose(0, 1).flatten(1, 2))  # [Hq, G*F, d]
        rows.append(torch.cat(parts, dim=1))  # [Hq, S, d]
    return torch.stack(rows).transpose(1, 2).contiguous(), None  # [B, S, Hq, d]


def _switch_on(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get(LAYOUT_KWARG) is not None:
        module._pathvlm_previous_attention = module.config._attn_implementation
        module.config._attn_implementation = NAME


def _switch_back(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    previous = module.__dict__.pop("_pathvlm_previous_attention", None)
    if previous is not None:
        module.config._attn_implementation = previous


def _install(attention_layers: Sequence[torch.nn.Module]) -> None:
    AttentionInterface.register(NAME, grouped_attention)
    for layer in attention_layers:
        if not getattr(layer, _HOOKED, False):
            layer.register_forward_pre_hook(_switch_on, with_kwargs=True)
            layer.register_forward_hook(_switch_back, with_kwargs=True, always_call=True)
            setattr(layer, _HOOKED, True)


@contextmanager
def grouped_attention_installed(model: PreTrainedModel, attention_layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Within: a forward given ``LAYOUT_KWARG=`` attends as grouped sequences and builds no mask.

    ``attention_layers`` are the decoder layers' self-attention modules (hooked once, kept: they act
    only on calls that carry the layout, which a recomputation under checkpointing does).
    """
    _install(attention_layers)
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    text_config._attn_implementation = NAME  # no mask is built for an attention function transformers does not know
    try:
        yield
    finally:
        text_config._attn_implementation = previous
