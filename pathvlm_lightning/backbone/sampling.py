"""One decoding step's choice of the next token from the model's logits, and its log-prob.

``Backbone.generate`` decodes with its own loop (``backbone/decoding.py``) so that a prompt is
pre-filled once for its G completions and so that each sampled token's log-prob is recorded as it is
drawn. This module holds the per-step rule that loop applies, the one transformers' ``generate``
applies with ``suppress_tokens``, ``min_new_tokens``, ``temperature`` and ``top_p`` (``top_k`` off):

1. vision ids are never chosen, nor an end-of-sequence id before ``min_new_tokens`` tokens;
2. sampling divides the logits by the temperature and keeps the smallest set of most likely ids
   whose probability reaches ``top_p`` (nucleus; the most likely id always stays);
3. greedy takes the arg-max of step 1's logits (ties: the lowest id, as ``torch.argmax``).

Sampling is an exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i p_i / E_i`` is id
``i`` with probability ``p_i / sum(p)`` (the first arrival of independent Poisson clocks of rates
``p_i``; the same law as the Gumbel-max trick). It needs no normalised probabilities, no cumulative
sum and no search: one uniform draw per id and an arg-max, vectorised over the rows. On 2 CPU cores
it draws from 16 x 151,936 probabilities about 2x faster than ``torch.multinomial``. The uniform
draws are float64, so ``E`` keeps full relative precision down to ~1e-16 (float32 uniforms are
multiples of 2**-24, which would distort ids of probability below ~1e-6).

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

    def next_tokens(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N] long, float32 log-probs [N] of those ids at the temperature) from logits [N, V].

        ``step`` is the number of tokens already generated (for ``min_new_tokens``). Draws from the
        torch generator of the logits' device.
        """
        scaled = logits.float() / self.temperature  # [N, V] float32, a fresh tensor
        log_norm = torch.logsumexp(scaled, dim=-1)  # [N]
        allowed = self._allowed(scaled, step)  # [N, V], removed ids at -inf
        if self.do_sample:
            tokens = race_sample(nucleus(allowed, self.top_p) if self.top_p < 1 else allowed)
        else:
            tokens = allowed.argmax(dim=-1)  # [N]
        picked = scaled.gather(1, tokens[:, None]).squeeze(1) - log_norm  # [N]
        return tokens, picked

    def _allowed(self, scaled: torch.Tensor, step: int) -> torch.Tensor:
        """``scaled`` [N, V] with suppressed ids (and eos before ``min_new_tokens``) at -inf; a copy."""
        removed = list(self.suppressed_ids)
        if step < self.min_new_tokens:
            removed += list(self.eos_token_ids)
        if not removed:
            return scaled
        allowed = scaled.clone()
        allowed[:, torch.tensor(removed, device=scaled.device)] = -torch.inf
        return allowed


def race_sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row [N] drawn with probability ``softmax(logits)`` from logits [N, V] (-inf: never).

    ``argmax(exp(logits - max) / E)`` with ``E ~ Exp(1)`` made from float64 uniforms (``-log U``).
    """
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # [N, V] unnormalised probabilities
    uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    arrival = uniform.log_().neg_().to(weights.dtype)  # [N, V] Exp(1); U = 0 gives inf: never chosen
    return weights.div_(arrival).argmax(dim=-1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` [N, V] with -inf outside each row's nucleus: the most likely ids whose probability
    sums to at least ``top_p`` (ids are dropped from the least likely up while the dropped mass stays
    at most ``1 - top_p``; the most likely id always stays). A new tensor."""
    ascending, order = logits.sort(dim=-1)  # [N, V]
    dropped_mass = ascending.softmax(dim=-1).cumsum(dim=-1)  # [N, V] mass of this id and all less likely
    drop = dropped_mass <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -torch.inf)  # back to id order
