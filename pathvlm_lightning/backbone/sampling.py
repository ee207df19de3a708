"""One decoding step's choice of the next token from the model's logits, and its log-prob.

``Backbone.generate`` decodes with its own loop (``backbone/decoding.py``) so that a prompt is
pre-filled once for its G completions and so that each sampled token's log-prob is recorded as it is
drawn. This module holds the per-step rule that loop applies, the one transformers' ``generate``
applies with ``suppress_tokens``, ``min_new_tokens``, ``temperature`` and ``top_p`` (``top_k`` off):

1. vision ids are never chosen, nor an end-of-sequence id before ``min_new_tokens`` tokens;
2. sampling divides the logits by the temperature and keeps the smallest set of most likely ids
   whose probability reaches ``top_p`` (nucleus; the most likely id always stays);
3. greedy takes the arg-max of step 1's logits (ties: the lowest id, as ``torch.argmax``).

Sampling inverts the cumulative distribution: with ``w = exp(logits - max)`` (0 for removed ids)
and one uniform ``u`` per row, the id is the first whose running sum of ``w`` exceeds ``u * sum(w)``,
so id ``i`` is drawn with probability ``w_i / sum(w)``: the softmax, with no normalisation pass and
one random number per row. The running sums and ``u`` are float64, so ids of probability down to
~1e-15 keep their share; the search runs over blocks of ids, then within one, so that no step holds
more than the logits' size (:func:`inverse_cdf_sample`). The decode loop hands the step two float32
[N, V] buffers that it overwrites at every step (scaled logits; exponentials, then weights), so the
step allocates nothing of the logits' size: fewer large blocks freed per token for glibc's heap to
fragment on (benchmark (b)). ``torch.multinomial`` (what transformers' sampler calls) draws from
the same law; on 2 CPU cores it took 2.2x as long for 16 x 151,936 ids. An exponential race
(``argmax(w / E)``, ``E ~ Exp(1)``, the Gumbel-max trick) needs a random number per id, and drawing
151,936 of them per row made it nearly as slow as ``torch.multinomial`` (0.91x; ``benchmarks/README.md``).

The recorded log-prob of the chosen id is ``log_softmax(logits / temperature)`` over the whole
vocabulary, before steps 1-2 remove ids: exactly what ``Backbone.token_logprobs(temperature=...)``
computes for the trainer, so the two differ only by floating-point rounding and the kernels used
(``rollout/sampler_kl``). The ids removed by steps 1-2 are a deliberate choice of the sampler, not a
disagreement between sampler and trainer, and would make that figure non-zero in exact arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingRule:
    """How the next token is chosen (see the module docstring).

    Args:
        temperature: logits are divided by it, for sampling and for the recorded log-probs.
        top_p: nucleus mass in (0, 1]; 1 keeps every id.
        do_sample: ``False`` is greedy.
        min_new_tokens: end-of-sequence ids are removed before this many tokens are generated.
        eos_token_ids: ids that end a completion.
        suppressed_ids: ids never chosen (vision slots).
    """

    eos_token_ids: tuple[int, ...]
    suppressed_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingRule: temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingRule: top_p must be in (0, 1], got {self.top_p!r}")

    def next_tokens(
        self, logits: torch.Tensor, step: int, scratch: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N] long, float32 log-probs [N] of those ids at the temperature) from logits [N, V].

        ``step`` is the number of tokens already generated (for ``min_new_tokens``). Draws from the
        torch generator of the logits' device. ``scratch``: float32 [2, N, V] that the step overwrites
        instead of allocating its two [N, V] buffers (the decode loop passes one for all its steps);
        with it, no op of the step (top_p 1) allocates anything of the logits' size.
        """
        if scratch is None:  # two separate blocks: none larger than the logits
            scaled, work = (torch.empty(logits.shape, dtype=torch.float32, device=logits.device) for _ in range(2))
        else:
            scaled, work = scratch[0], scratch[1]
        scaled.copy_(logits).div_(self.temperature)  # [N, V] float32: logits.float() / T, in place
        log_norm = _logsumexp(scaled, work)  # [N]
        removed = self._removed(step)
        if removed:  # removed ids at -inf, in place (the picked id is never one of them)
            scaled.index_fill_(1, torch.tensor(removed, device=scaled.device), -torch.inf)
        if self.do_sample:
            tokens = inverse_cdf_sample(nucleus(scaled, self.top_p) if self.top_p < 1 else scaled, out=work)
        else:
            tokens = scaled.argmax(dim=-1)  # [N]
        picked = scaled.gather(1, tokens[:, None]).squeeze(1) - log_norm  # [N]
        return tokens, picked

    def _removed(self, step: int) -> list[int]:
        """Ids not chosen at ``step``: the suppressed ones, and the end-of-sequence ids before ``min_new_tokens``."""
        return list(self.suppressed_ids) + (list(self.eos_token_ids) if step < self.min_new_tokens else [])


def _logsumexp(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1)`` [N] for finite x [N, V], its [N, V] exponentials written into ``work``.

    The same ops as torch's own (max, exp of the difference, sum, log, add the max), so the same bits.
    """
    top = x.amax(dim=-1)  # [N]
    torch.sub(x, top[:, None], out=work).exp_()
    return work.sum(dim=-1).log_().add_(top)


SAMPLE_BLOCK = 4096
"""Ids per block of :func:`inverse_cdf_sample`'s two-level search."""


def inverse_cdf_sample(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    block: int = SAMPLE_BLOCK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One id per row [N] drawn with probability ``softmax(logits)`` from logits [N, V] (-inf: never).

    With ``w = exp(logits - max)`` and ``u`` uniform in [0, 1) (float64), the id is the first whose running
    sum of ``w`` exceeds ``u * sum(w)``, found in two levels so that no step allocates more than the
    logits' own size: the vocabulary's blocks of ``block`` ids (float32 block sums, their float64
    running sum [N, V / block]) give the block, then the chosen block's float64 running sum [N, block]
    gives the id, at the same fraction of the block's own total. Ids within a block keep their float64
    shares (down to ~1e-15); a block's mass carries the float32 sum's rounding (~1e-7 relative).

    Why the size matters (``benchmarks/README.md``, benchmark (b)): a float64 [N, V] running sum, twice
    the logits, freed at every decoding step, raised glibc's dynamic mmap threshold above the logits'
    size, so every [N, V] float32 temporary of the decode loop went to the heap, interleaved with the
    growing key/value cache, and the heap fragmented: +2.2 GiB of resident memory over 256 steps.
    ``out`` (float32 [N, V], may not be ``logits``) receives the weights instead of a new tensor.
    """
    top = logits.amax(dim=-1, keepdim=True)  # [N, 1]
    weights = (torch.sub(logits, top, out=out) if out is not None else logits - top).exp_()  # [N, V] unnormalised
    rows, vocab = weights.shape
    block = max(1, min(block, vocab))
    full = vocab - vocab % block
    sums = weights[:, :full].view(rows, full // block, block).sum(dim=-1)  # [N, nb] float32
    if full < vocab:
        sums = torch.cat([sums, weights[:, full:].sum(dim=-1, keepdim=True)], dim=1)  # the short last block
    blocks = sums.shape[1]
    running = sums.double().cumsum(dim=-1)  # [N, nb]
    uniform = torch.rand((rows, 1), dtype=torch.float64, device=logits.device, generator=generator)
    target = uniform * running[:, -1:]  # [N, 1]
    order = torch.arange(1, blocks + 1, device=logits.device)
    last_positive = ((sums > 0) * order).argmax(dim=-1, keepdim=True)  # [N, 1] (u * total rounded up to total)
    chosen = torch.searchsorted(running, target, right=True).clamp_(max=blocks - 1)  # [N, 1]
    chosen = torch.minimum(chosen, last_positive)
    before = running.gather(1, (chosen - 1).clamp(min=0)).masked_fill_(chosen == 0, 0.0)  # [N, 1]
    fraction = ((target - before) / sums.gather(1, chosen).double()).clamp_(0.0, 1.0)  # [N, 1] within the block
    index = chosen * block + torch.arange(block, device=logits.device)  # [N, block]
    inside = index < vocab
    local = weights.gather(1, index.clamp(max=vocab - 1)).double().masked_fill_(~inside, 0.0).cumsum(dim=-1)
    position = torch.searchsorted(local, fraction * local[:, -1:], right=True)  # [N, 1]
    grows = local > torch.cat([local.new_zeros(rows, 1), local[:, :-1]], dim=1)  # [N, block] ids of weight > 0
    last_nonzero = (grows * torch.arange(1, block + 1, device=logits.device)).argmax(dim=-1, keepdim=True)  # [N, 1]
    position = torch.minimum(position, last_nonzero)
    return (chosen * block + position).squeeze(1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` [N, V] with -inf outside each row's nucleus: the most likely ids whose probability
    sums to at least ``top_p`` (ids are dropped from the least likely up while the dropped mass stays
    at most ``1 - top_p``; the most likely id always stays). A new tensor."""
    ascending, order = logits.sort(dim=-1)  # [N, V]
    dropped_mass = ascending.softmax(dim=-1).cumsum(dim=-1)  # [N, V] mass of this id and all less likely
    drop = dropped_mass <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -torch.inf)  # back to id order
