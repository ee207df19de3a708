r"""What every policy loss shares: the ``forward`` signature, the k3 KL term, the token aggregations and
the step totals that make micro-batch shares add up.

A loss turns token log-probabilities and one advantage per completion into a scalar. Each subclass
supplies only its per-token policy objective :math:`s_{i,t}` (:meth:`PolicyLoss.objective`); this
base adds the KL penalty to the reference and reduces over tokens:

.. math::

    \mathrm{KL}_{i,t} = \exp(\log\pi_{ref} - \log\pi_\theta) - (\log\pi_{ref} - \log\pi_\theta) - 1
    \qquad \text{(the k3 estimator, always} \ge 0\text{)}

    \ell_{i,t} = -(s_{i,t} - \beta\,\mathrm{KL}_{i,t})

The per-token losses of the valid (masked-in) tokens are aggregated by ``aggregation``:

- ``grpo`` (DeepSeekMath, arXiv 2402.03300): mean over each completion's tokens, then mean over
  completions. A token of a short completion weighs more than one of a long completion.
- ``bnpo``: sum over all tokens / valid tokens of the step (on this rank).
- ``dr_grpo`` (Dr. GRPO, arXiv 2503.20783): sum over all tokens / (completions x
  ``max_completion_length``), a constant, so the loss has no length bias. The module binds the
  length from the rollout's ``max_new_tokens`` (:meth:`PolicyLoss.bind`).
- ``dapo`` (DAPO token-level, arXiv 2503.14476): sum over all tokens / ``num_tokens``, the
  valid-token count of the whole optimizer step over all ranks divided by the averaging the
  gradient reduction applies (world size, accumulation), so the step's gradient is the token mean
  over the global batch. Without ``num_tokens`` dapo equals bnpo.

**Micro-batches.** The normalisers (completions, tokens, ``num_tokens``) belong to the whole step:
count them once with :meth:`StepTotals.of` over the step's full mask and pass ``totals=`` to every
call; each call then returns its *share* of the step's loss and statistics, so the shares add up to
the full-batch values and their gradients to the full-batch gradient (:func:`sum_stats` adds the
statistics). Without ``totals`` the call is its own whole step.

With ``old_logprobs=None`` (one optimisation pass per rollout) the old policy is the current one
detached: every ratio is 1 in value and its gradient is :math:`\nabla\log\pi_\theta`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class LossStats:
    """Detached scalars for logging. Token fractions and means are over the valid tokens (GSPO's, a
    sequence-level loss, over completions; see its docstring)."""

    policy_loss: torch.Tensor  # the loss without the KL term, same aggregation
    kl: torch.Tensor | None  # mean k3 KL to the reference; None when no reference was given
    clip_low_fraction: torch.Tensor  # clipped below (see each loss for what "clipped" means)
    clip_high_fraction: torch.Tensor  # clipped above
    ratio_mean: torch.Tensor


@dataclass(frozen=True)
class StepTotals:
    """The counts one optimizer step (on this rank) is normalised by, over all its micro-batches."""

    completions: int  # N, the step's completions (grpo's mean, dr_grpo's constant)
    tokens: float  # the step's valid tokens (bnpo, and the statistics' token means)

    @classmethod
    def of(cls, mask: torch.Tensor) -> StepTotals:
        """Totals of a step whose completion mask is ``mask`` [N, L]."""
        return cls(completions=mask.shape[0], tokens=float(mask.sum()))


def sum_stats(parts: Sequence[LossStats]) -> LossStats:
    """The statistics of a whole step from the shares its micro-batches returned (``totals=``)."""
    kls = [p.kl for p in parts]
    return LossStats(
        policy_loss=sum(p.policy_loss for p in parts),
        kl=None if any(k is None for k in kls) else sum(kls),
        clip_low_fraction=sum(p.clip_low_fraction for p in parts),
        clip_high_fraction=sum(p.clip_high_fraction for p in parts),
        ratio_mean=sum(p.ratio_mean for p in parts),
    )


@dataclass(frozen=True)
class PolicyTerms:
    """What a loss's :meth:`PolicyLoss.objective` returns: the per-token objective and its statistics."""

    objective: torch.Tensor  # [N, L] s_{i,t}, maximised (the loss is its negative)
    ratio: torch.Tensor  # [N, L] (or [N, 1] per sequence) the importance ratio, for ratio_mean
    clipped_low: torch.Tensor  # bool, same shape as ratio
    clipped_high: torch.Tensor  # bool, same shape as ratio


class PolicyLoss(nn.Module):
    """Base of the policy losses: one ``forward`` signature, the k3 KL term and the aggregation.

    Args:
        beta: KL coefficient; 0 drops the term, and with it the need for a reference model
            (the module's settings check reads :attr:`needs_reference`).
        aggregation: how per-token losses become a scalar (module docstring).
    """

    def __init__(self, beta: float = 0.04, aggregation: Aggregation = "grpo") -> None:
        super().__init__()
        if not 0 <= beta < float("inf"):
            raise ValueError(f"{type(self).__name__}: beta must be a finite number >= 0, got {beta!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.beta = float(beta)
        self.aggregation = aggregation
        self.max_completion_length: int | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether ``forward`` needs the reference model's log-probs (``beta > 0``)."""
        return self.beta > 0

    @property
    def needs_global_token_count(self) -> bool:
        """Whether the caller should pass ``num_tokens`` (the dapo aggregation's global count)."""
        return self.aggregation == "dapo"

    def bind(self, *, max_completion_length: int) -> PolicyLoss:
        """Settings the loss takes from the rest of the run, given by the module once they are known:
        ``max_completion_length`` is the rollout's ``max_new_tokens`` (the dr_grpo normaliser)."""
        if not (isinstance(max_completion_length, int) and max_completion_length > 0):
            raise ValueError(f"max_completion_length must be an integer > 0, got {max_completion_length!r}")
        self.max_completion_length = max_completion_length
        return self

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: the loss as YAML names it (for hparams.yaml);
        every constructor argument is kept as the attribute of the same name."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        cls = type(self)
        module = cls.__module__.rsplit(".", 1)[0] if cls.__module__.startswith("pathvlm_lightning.grpo.losses.") else cls.__module__
        return {"class_path": f"{module}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    def objective(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor
    ) -> PolicyTerms:
        """The per-token objective ``s`` [N, L] from the policy's log-probs [N, L] (grad), the old
        policy's [N, L] (no grad), the advantages [N, 1] and the valid-token mask [N, L] (bool)."""
        raise NotImplementedError

    def forward(
        self,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        num_tokens: float | None = None,
        totals: StepTotals | None = None,
    ) -> tuple[torch.Tensor, LossStats]:
        """Scalar loss and its statistics (this micro-batch's shares of them when ``totals`` is given).

        Args:
            logprobs: ``[N, L]`` log-probabilities of the sampled tokens under the policy (grad).
            advantages: ``[N]`` one advantage per completion.
            mask: ``[N, L]`` 1 for completion tokens, 0 for padding.
            old_logprobs: ``[N, L]`` the sampling policy's log-probabilities; None when this is
                the first pass over the rollout (the current policy, detached).
            ref_logprobs: ``[N, L]`` the reference model's; required when ``beta > 0``; with
                ``beta == 0`` it only feeds the logged KL.
            num_tokens: ``dapo`` aggregation only: the global valid-token count to divide by.
            totals: the counts of the whole step this call is a micro-batch of; None: this call
                is the whole step (``StepTotals.of(mask)``).
        """
        self._check_inputs(logprobs, advantages, mask, old_logprobs, ref_logprobs, num_tokens)
        totals = StepTotals.of(mask) if totals is None else totals
        tokens = max(totals.tokens, 1.0)  # an all-padding step contributes 0, not 0/0
        valid = mask.bool()  # [N, L]
        mask = mask.to(logprobs.dtype)  # [N, L]
        old = logprobs.detach() if old_logprobs is None else old_logprobs  # [N, L]
        adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [N, 1]

        terms = self.objective(logprobs, old, adv, valid)
        per_token = -terms.objective  # [N, L]
        kl = None
        if ref_logprobs is not None:
            delta = torch.where(valid, ref_logprobs - logprobs, 0.0)  # [N, L]
            kl = torch.exp(delta) - delta - 1  # [N, L]
            if self.beta > 0:
                per_token = per_token + self.beta * kl

        loss = self._aggregate(per_token, mask, num_tokens, totals)
        with torch.no_grad():
            stats = LossStats(
                policy_loss=self._aggregate(-terms.objective, mask, num_tokens, totals),
                kl=None if kl is None else _token_share(kl, mask, tokens),
                **self._ratio_stats(terms, mask, totals),
            )
        return loss, stats

    def _ratio_stats(self, terms: PolicyTerms, mask: torch.Tensor, totals: StepTotals) -> dict[str, torch.Tensor]:
        """Token shares of the clip fractions and the ratio mean (GSPO overrides: per completion)."""
        tokens = max(totals.tokens, 1.0)
        return dict(
            clip_low_fraction=_token_share(terms.clipped_low.to(mask.dtype), mask, tokens),
            clip_high_fraction=_token_share(terms.clipped_high.to(mask.dtype), mask, tokens),
            ratio_mean=_token_share(terms.ratio, mask, tokens),
        )

    def _aggregate(
        self, per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None, totals: StepTotals
    ) -> torch.Tensor:
        """Reduce ``[N, L]`` per-token losses to this batch's share of the step's scalar loss;
        empty completions contribute 0."""
        masked = per_token * mask  # [N, L]
        if self.aggregation == "grpo":
            per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]
            return per_sequence.sum() / max(totals.completions, 1)
        if self.aggregation == "dr_grpo":
            return masked.sum() / (max(totals.completions, 1) * self.max_completion_length)
        if self.aggregation == "dapo" and num_tokens is not None:
            return masked.sum() / num_tokens
        return masked.sum() / max(totals.tokens, 1.0)

    def _check_inputs(
        self,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        num_tokens: float | None,
    ) -> None:
        name = type(self).__name__
        if logprobs.dim() != 2:
            raise ValueError(f"{name}: logprobs must be [N, L], got shape {tuple(logprobs.shape)}")
        shape = logprobs.shape
        named = {"mask": mask, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
        for key, tensor in named.items():
            if tensor is not None and tensor.shape != shape:
                raise ValueError(f"{name}: {key} must match logprobs {tuple(shape)}, got {tuple(tensor.shape)}")
        if advantages.shape != shape[:1]:
            raise ValueError(f"{name}: advantages must be [{shape[0]}], got {tuple(advantages.shape)}")
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError(f"{name}: beta={self.beta} needs ref_logprobs (or set beta=0)")
        if self.aggregation == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError(
                    f"{name}: aggregation 'dr_grpo' needs max_completion_length; the module binds the rollout's "
                    "max_new_tokens in setup (loss.bind(max_completion_length=...))"
                )
            if shape[1] > self.max_completion_length:
                raise ValueError(
                    f"{name}: completions of {shape[1]} tokens exceed max_completion_length="
                    f"{self.max_completion_length}, the dr_grpo normaliser"
                )
        if num_tokens is not None:
            if self.aggregation != "dapo":
                raise ValueError(f"{name}: num_tokens is only used by aggregation 'dapo', not {self.aggregation!r}")
            if not num_tokens > 0:
                raise ValueError(f"{name}: num_tokens must be > 0, got {num_tokens!r}")


def check_clip(name: str, epsilon_low: float | None, epsilon_high: float) -> None:
    """Clip ranges: the floor ``1 - epsilon_low`` in [0, 1) (None: no floor), the ceiling ``1 + epsilon_high``."""
    if epsilon_low is not None and not 0 <= epsilon_low < 1:
        raise ValueError(f"{name}: epsilon_low must be in [0, 1), got {epsilon_low!r}")
    if not epsilon_high >= 0:
        raise ValueError(f"{name}: epsilon_high must be >= 0, got {epsilon_high!r}")


def log_ratio(logprobs: torch.Tensor, old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log pi - log pi_old`` [N, L], 0 at padding: padding may hold arbitrary log-probs, and an
    overflowing exp there would turn the masked sum (or its gradient) into NaN."""
    return torch.where(valid, logprobs - old, 0.0)


def _token_share(values: torch.Tensor, mask: torch.Tensor, tokens: float) -> torch.Tensor:
    """Sum of ``[N, L]`` values over the valid tokens / the step's ``tokens``: the token mean's share."""
    return (values * mask).sum() / tokens
