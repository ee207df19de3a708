"""Token log-probs from final hidden states without ever holding the ``[N, L, V]`` logits.

With Qwen's 151,936-entry vocabulary the logits of 8 completions x 1,024 tokens are 4.7 GiB in
float32, and a plain ``log_softmax`` keeps more copies of them for backward. Here the output layer,
temperature, log-softmax and gather run over blocks of the vocabulary, all (row, position) pairs at
once: a block of ``Vb`` output rows gives the ``[M, Vb]`` logits of all M pairs, with
``M * Vb <= chunk_size * V``, so one block holds as many logits as ``chunk_size`` pairs' full rows.
The forward keeps only each pair's log-normaliser (an online log-sum-exp over the blocks); the
backward recomputes each block. Blocking the vocabulary rather than the pairs is what keeps full
fine-tuning lean: each weight-gradient row block is one GEMM over all M pairs, written once into
the gradient in the weight's own dtype (no float32 ``[V, H]`` accumulator and no cast copy of it),
and only the hidden-state gradient ``[M, H]`` (``H / V`` of the logits' size) is summed over blocks.

The GEMMs run in the compute dtype: the weight's dtype, or autocast's when autocast is on (bf16
under ``bf16-mixed``), with float32 accumulation inside the kernel (cuBLAS and oneDNN accumulate
bf16 products in float32); log-softmax, its gradient and the log-normalisers are float32.

The hidden states come from the model's own root forward (``output_hidden_states=True`` with
``logits_to_keep=1``), so FSDP2's root hooks and peft's wrappers run as usual; transformers 5.x
records the final-normed state as the last entry of ``hidden_states`` (checked by a test against
the model's logits, tied and untied output layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import ModelOutput

# 512 pairs' rows x 151,936 ids x 4 bytes = 297 MiB per block buffer, 1/16 of the float32 logits of
# 8 x 1,024 completion tokens. At that size a 7B model's block GEMM is 8,192 x 3,584 x 9,496
# multiply-adds (0.56 TFLOP, about a millisecond on an H200): already large enough to run at full
# speed, so larger blocks would buy memory use and nothing else.
DEFAULT_CHUNK_SIZE = 512


def final_hidden_states(outputs: ModelOutput) -> torch.Tensor:
    """The last (final-normed) hidden state ``[N, S, H]`` of a forward run with ``output_hidden_states=True``."""
    if outputs.hidden_states is None:
        raise ValueError("the model output has no hidden_states: run the forward with output_hidden_states=True")
    return outputs.hidden_states[-1]


def output_layer(model: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output projection, usable outside its forward.

    The layer must be a plain floating-point ``nn.Linear``. Under FSDP2 a root that keeps its
    parameters gathered (the policy's root always between forward and backward, any root inside
    ``sharding.root_gathered``) exposes FSDP's own unsharded parameters: nothing is gathered here,
    and gradients reach FSDP's reduce-scatter as usual. A root that resharded after its forward
    (the frozen reference's, outside that block) exposes DTensor shards: without gradients they are
    all-gathered here, cast to ``dtype`` (the compute dtype, e.g. the hidden states') before the
    gather so the copy is no larger than the compute needs; with gradients that would bypass
    FSDP's reduction, so it is an error.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        raise TypeError(
            f"chunked log-probs need a plain floating-point nn.Linear output layer; got {type(head).__name__} "
            f"with {head.weight.dtype} weights (adapters or quantisation on lm_head are not supported)"
        )
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        if torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError(
                "the output layer's weight is an FSDP2 shard after the forward (its root resharded), so "
                "log-prob gradients cannot reach FSDP's reduction; keep the root gathered after forward "
                "(fully_shard(..., reshard_after_forward=False) on the root, as apply_fully_shard does)"
            )
        weight = _gathered(weight, dtype)
        bias = _gathered(bias, dtype) if isinstance(bias, DTensor) else bias
    return weight, bias


def _gathered(shard: DTensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The full tensor of a DTensor shard, cast to ``dtype`` on the shard before the all-gather."""
    return (shard.to(dtype) if dtype is not None else shard).full_tensor()


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's GEMMs run in: autocast's when it is on for the weight's device,
    else the weight's own (FSDP2's ``param_dtype`` gathers it already in the compute dtype)."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def chunked_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """float32 ``log_softmax((hidden @ weight.T + bias) / temperature)`` at ``targets``.

    hidden [N, L, H] (final-normed, any float dtype), weight [V, H] (the lm_head's; may be tied to
    the input embedding), bias [V] or None, targets [N, L] ids in ``[0, V)`` -> [N, L] float32.
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. The projection runs in
    :func:`compute_dtype` with float32 accumulation, as the model's own ``lm_head`` would; softmax
    and log-probs in float32. Equal to the unchunked computation up to float rounding (summation
    order only). Gradients come back in each input's dtype: the weight's is written block by block
    straight into a tensor of the weight's dtype, each element from one GEMM over all N*L pairs.
    ``chunk_size``: the logits held at once, counted in full vocabulary rows of (row, position) pairs.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [N, L]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = weight.shape[0]
    _check_targets(targets, vocab)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [M, H], M = N*L
    block = min(vocab, max(1, math.ceil(chunk_size * vocab / max(flat.shape[0], 1))))
    picked = _VocabBlockedLogprobs.apply(
        flat, weight, bias, targets.reshape(-1), float(temperature), block, compute_dtype(weight)
    )
    return picked.view(targets.shape)  # [N, L]


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Ids outside ``[0, vocab)`` would match no block and be scored silently wrong: refuse them.
    Fake tensors (memory planning, ``benchmarks/logprob_memory.py --full-ft``) have no values to check."""
    if targets.numel() == 0 or isinstance(targets, FakeTensor):
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"targets must be ids in [0, {vocab}) (the output layer's rows); got ids from {low} to {high}")


def _block_logits(
    hidden: torch.Tensor,  # [M, H] in the compute dtype
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,
    lo: int,
    hi: int,
    temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits / temperature [M, hi-lo] as a fresh tensor to edit in place, the GEMM's own
    output in ``dtype`` [M, hi-lo], a buffer the caller may reuse; the same tensor when float32)."""
    block_bias = bias[lo:hi].to(dtype) if bias is not None else None
    low = F.linear(hidden, weight[lo:hi].to(dtype), block_bias)  # [M, Vb], as the model's lm_head computes it
    scaled = low.float() if low.dtype != torch.float32 else low
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled, low


def _in_block(targets: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets - lo clamped into the block [M], whether each target lies in [lo, hi) [M])."""
    return (targets - lo).clamp_(0, hi - lo - 1), (targets >= lo) & (targets < hi)


class _VocabBlockedLogprobs(torch.autograd.Function):
    """Forward keeps only each pair's log-normaliser; backward recomputes each vocabulary block."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, block, dtype):
        # hidden [M, H], weight [V, H], bias [V] | None, targets [M] -> [M] float32
        rows, vocab = hidden.shape[0], weight.shape[0]
        running_max = torch.full((rows,), -math.inf, dtype=torch.float32, device=hidden.device)
        running_sum = torch.zeros_like(running_max)
        target_logit = torch.zeros_like(running_max)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            compute_hidden = hidden.to(dtype)
            for lo in range(0, vocab, block):
                hi = min(lo + block, vocab)
                scaled = _block_logits(compute_hidden, weight, bias, lo, hi, temperature, dtype)[0]  # [M, Vb]
                local, inside = _in_block(targets, lo, hi)
                target_logit = torch.where(inside, scaled.gather(1, local[:, None]).squeeze(1), target_logit)
                new_max = torch.maximum(running_max, scaled.amax(dim=1))  # [M]
                running_sum.mul_((running_max - new_max).exp_()).add_(scaled.sub_(new_max[:, None]).exp_().sum(dim=1))
                running_max = new_max
                del scaled
        lse = running_max + running_sum.log()  # [M]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.block, ctx.dtype = temperature, block, dtype
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_picked):
        # grad_picked [M]; d picked / d logits = (onehot(target) - softmax) / temperature
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, vocab = ctx.dtype, weight.shape[0]
        # The hidden-state gradient is the one sum over blocks: kept in float32 [M, H] unless hidden is.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None  # [V, H], filled block by block
        grad_bias = torch.empty_like(bias) if need_bias else None
        scale = grad_picked.float() / ctx.temperature  # [M]
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            compute_hidden = hidden.to(dtype)
            for lo in range(0, vocab, ctx.block):
                hi = min(lo + ctx.block, vocab)
                probs, low = _block_logits(compute_hidden, weight, bias, lo, hi, ctx.temperature, dtype)  # [M, Vb]
                probs.sub_(lse[:, None]).exp_()  # softmax restricted to the block
                local, inside = _in_block(targets, lo, hi)
                probs.scatter_add_(1, local[:, None], -inside.to(probs.dtype)[:, None])
                grad_logits = probs.mul_(-scale[:, None])  # [M, Vb] float32
                if need_bias:
                    grad_bias[lo:hi] = grad_logits.sum(dim=0)
                if grad_logits is not low:
                    grad_logits = low.copy_(grad_logits)  # into the GEMM's buffer, in the compute dtype
                del probs  # (the float32 buffer; with float32 compute the same tensor as grad_logits)
                if need_weight:  # [Vb, H]: one GEMM over all M pairs, rounded once into the weight's dtype
                    if grad_weight.dtype == dtype:
                        torch.mm(grad_logits.t(), compute_hidden, out=grad_weight[lo:hi])
                    else:
                        grad_weight[lo:hi] = grad_logits.t() @ compute_hidden
                if need_hidden and dtype == torch.float32:
                    grad_hidden.addmm_(grad_logits, weight[lo:hi])  # [M, H], in place
                elif need_hidden:
                    grad_hidden += grad_logits @ weight[lo:hi].to(dtype)  # [M, H]
                del grad_logits, low
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
