"""Token log-probs from final hidden states without ever holding the ``[N, L, V]`` logits.

With Qwen's 151,936-entry vocabulary the logits of 8 completions x 1,024 tokens are 4.7 GiB in
float32, and a plain ``log_softmax`` keeps more copies of them for backward. Here the output layer,
temperature, log-softmax and gather run over chunks of ``chunk_size`` (row, position) pairs; only
the log-normaliser of each pair is kept, and backward recomputes each chunk's logits. Memory of the
vocabulary part is one chunk's ``[chunk_size, V]`` float32 buffer (plus a second in the weight's
dtype when it is not float32), whatever N and L are.

The hidden states come from the model's own root forward (``output_hidden_states=True`` with
``logits_to_keep=1``), so FSDP2's root hooks and peft's wrappers run as usual; transformers 5.x
records the final-normed state as the last entry of ``hidden_states`` (checked by a test against
the model's logits, tied and untied output layers).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import ModelOutput

# 512 pairs x 151,936 ids x 4 bytes = 297 MiB per chunk buffer, 1/16 of the float32 logits of
# 8 x 1,024 completion tokens. Per chunk a 7B model's projection is 512 x 3,584 x 151,936 multiply-adds
# (0.56 TFLOP, about a millisecond on an H200): already large enough to run at full speed, so larger
# chunks would buy memory use and nothing else.
DEFAULT_CHUNK_SIZE = 512


def final_hidden_states(outputs: ModelOutput) -> torch.Tensor:
    """The last (final-normed) hidden state ``[N, S, H]`` of a forward run with ``output_hidden_states=True``."""
    if outputs.hidden_states is None:
        raise ValueError("the model output has no hidden_states: run the forward with output_hidden_states=True")
    return outputs.hidden_states[-1]


def output_layer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output projection, usable outside its forward.

    The layer must be a plain floating-point ``nn.Linear``. Under FSDP2 a root that keeps its
    parameters gathered after forward (``apply_fully_shard``'s policy root) exposes them as plain
    tensors and their gradients reach FSDP's reduce-scatter as usual. A root that resharded (the
    frozen reference's) exposes DTensor shards: without gradients they are all-gathered here; with
    gradients that would bypass FSDP's reduction, so it is an error.
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
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


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
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. The projection runs in the weight's
    dtype, as the model's own ``lm_head`` would; softmax and log-probs in float32. Equal to the
    unchunked computation up to float rounding (summation order only); the weight gradient is
    accumulated over chunks in float32 and returned in the weight's dtype.
    ``chunk_size``: (row, position) pairs per chunk, counted over the flattened ``N * L``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [N, L]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N*L, H]
    picked = _ChunkedTargetLogprobs.apply(flat, weight, bias, targets.reshape(-1), float(temperature), chunk_size)
    return picked.view(targets.shape)  # [N, L]


def _scaled_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """float32 logits / temperature [c, V] of one chunk, as a fresh tensor that may be edited in place."""
    logits = hidden.to(weight.dtype) @ weight.t()  # [c, V]
    if bias is not None:
        logits += bias
    scaled = logits.float() if logits.dtype != torch.float32 else logits
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """Forward keeps only each pair's log-normaliser; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        # hidden [M, H], weight [V, H], bias [V] | None, targets [M] -> [M] float32
        picked = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(picked)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                scaled = _scaled_logits(hidden[start:stop], weight, bias, temperature)  # [c, V]
                target = scaled.gather(1, targets[start:stop, None]).squeeze(1)  # [c]
                peak = scaled.amax(dim=1, keepdim=True)  # [c, 1]
                norm = scaled.sub_(peak).exp_().sum(dim=1).log_() + peak.squeeze(1)  # [c]
                lse[start:stop] = norm
                picked[start:stop] = target - norm
                del scaled
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return picked

    @staticmethod
    def backward(ctx, grad_picked):
        # grad_picked [M]; d picked / d logits = (onehot(target) - softmax) / temperature
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        scale = grad_picked.float() / ctx.temperature  # [M]
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            chunk = hidden[start:stop]
            probs = _scaled_logits(chunk, weight, bias, ctx.temperature)  # [c, V]
            probs.sub_(lse[start:stop, None]).exp_()  # softmax
            probs.scatter_add_(1, targets[start:stop, None], probs.new_full((chunk.shape[0], 1), -1.0))
            grad_logits = probs.mul_(-scale[start:stop, None])  # [c, V] float32
            if need_hidden:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)  # [c, H]
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), chunk.float())  # [V, H]
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            del probs, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None
