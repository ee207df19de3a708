r"""The GRPO objective as a pure module: token log-probabilities and advantages in, loss out.

For token ``t`` of completion ``i`` (advantage :math:`A_i`, one per completion):

.. math::

    \rho_{i,t} = \exp(\log\pi_\theta - \log\pi_{old}), \qquad
    s_{i,t} = \min\big(\rho_{i,t} A_i,\
              \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\big)

    \mathrm{KL}_{i,t} = \exp(\log\pi_{ref} - \log\pi_\theta) - (\log\pi_{ref} - \log\pi_\theta) - 1
    \qquad \text{(the k3 estimator, always} \ge 0\text{)}

    \ell_{i,t} = -(s_{i,t} - \beta\,\mathrm{KL}_{i,t})

The per-token losses of the valid (masked-in) tokens are then aggregated by ``loss_type``:

- ``grpo`` (DeepSeekMath): mean over each completion's tokens, then mean over completions. A token
  of a short completion weighs more than one of a long completion.
- ``bnpo``: sum over all tokens / valid tokens of the step (on this rank). Every token weighs the
  same, but only within the rank's batch.
- ``dr_grpo`` (Dr. GRPO): sum over all tokens / (completions x ``max_completion_length``), a
  constant, so the loss has no length bias at all.
- ``dapo`` (DAPO token-level): sum over all tokens / ``num_tokens``, the valid-token count of the
  whole optimizer step over all ranks. Pass ``num_tokens`` as that global count divided by any
  averaging the caller's gradient reduction applies (the world size under DDP/FSDP, times the
  accumulation steps when Lightning scales the loss by ``1 / accumulate_grad_batches``), so the
  step's gradient is exactly the token mean over the global batch. Without ``num_tokens`` dapo
  equals bnpo.

**Micro-batches.** The normalisers above (completions, tokens, ``num_tokens``) belong to the whole
step. To split a step into micro-batches, count them once with :meth:`StepTotals.of` over the
step's full mask and pass ``totals=`` to every call: each call then returns its *share* of the
step's loss and statistics (the same denominators, its own numerators), so the shares add up to the
full-batch values and their gradients to the full-batch gradient, for every ``loss_type``
(:func:`sum_stats` adds the statistics). Without ``totals`` the call is its own whole step.

With ``old_logprobs=None`` (one optimisation pass per rollout, ``num_iterations == 1``) the old
policy is the current one detached: the ratio is 1 in value, yet its gradient is
:math:`\nabla\log\pi_\theta`, so the surrogate's gradient is the policy gradient :math:`A_i
\nabla\log\pi_\theta` and clipping never triggers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class GRPOLossStats:
    """Detached scalars for logging. Token fractions and means are over the valid tokens."""

    policy_loss: torch.Tensor  # the loss without the KL term, same aggregation
    kl: torch.Tensor | None  # mean k3 KL to the reference; None when no reference was given
    clip_low_fraction: torch.Tensor  # ratio < 1 - epsilon_low with A < 0 (clipped, no gradient)
    clip_high_fraction: torch.Tensor  # ratio > 1 + epsilon_high with A > 0 (clipped, no gradient)
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


def sum_stats(parts: Sequence[GRPOLossStats]) -> GRPOLossStats:
    """The statistics of a whole step from the shares its micro-batches returned (``totals=``)."""
    kls = [p.kl for p in parts]
    return GRPOLossStats(
        policy_loss=sum(p.policy_loss for p in parts),
        kl=None if any(k is None for k in kls) else sum(kls),
        clip_low_fraction=sum(p.clip_low_fraction for p in parts),
        clip_high_fraction=sum(p.clip_high_fraction for p in parts),
        ratio_mean=sum(p.ratio_mean for p in parts),
    )


class GRPOLoss(nn.Module):
    """Clipped-ratio surrogate minus ``beta`` x k3 KL, aggregated by ``loss_type`` (see the
    module docstring for the formula).

    Args:
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
        epsilon_low: lower clip range, ratio floor ``1 - epsilon_low``.
        epsilon_high: upper clip range, ratio ceiling ``1 + epsilon_high`` (DAPO's clip-higher
            uses 0.28 to leave room for rare tokens to grow).
        beta: KL coefficient; 0 drops the term (and the need for a reference model).
        max_completion_length: the constant normaliser of ``dr_grpo`` (required for it).
    """

    def __init__(
        self,
        loss_type: LossType = "grpo",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.04,
        max_completion_length: int | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
        if not 0 <= epsilon_low < 1:
            raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low!r}")
        if not epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high!r}")
        if not 0 <= beta < float("inf"):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if loss_type == "dr_grpo" and not (
            isinstance(max_completion_length, int) and max_completion_length > 0
        ):
            raise ValueError(
                "loss_type 'dr_grpo' needs max_completion_length > 0, "
                f"got {max_completion_length!r}"
            )
        self.loss_type = loss_type
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.beta = float(beta)
        self.max_completion_length = max_completion_length

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
    ) -> tuple[torch.Tensor, GRPOLossStats]:
        """Scalar loss and its statistics (this micro-batch's shares of them when ``totals`` is given).

        Args:
            logprobs: ``[N, L]`` log-probabilities of the sampled tokens under the policy (grad).
            advantages: ``[N]`` one advantage per completion.
            mask: ``[N, L]`` 1 for completion tokens, 0 for padding.
            old_logprobs: ``[N, L]`` the sampling policy's log-probabilities; None when this is
                the first pass over the rollout (the current policy, detached).
            ref_logprobs: ``[N, L]`` the reference model's; required when ``beta > 0``; with
                ``beta == 0`` it only feeds the logged KL.
            num_tokens: ``dapo`` only: the global valid-token count to divide by.
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

        # Padding positions may hold arbitrary log-probs; zeroing their log-ratios keeps an
        # overflowing exp there from turning the masked sum (or its gradient) into NaN.
        ratio = torch.exp(torch.where(valid, logprobs - old, 0.0))  # [N, L]
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)  # [N, L]
        surrogate = torch.minimum(ratio * adv, clipped * adv)  # [N, L]
        per_token = -surrogate  # [N, L]

        kl = None
        if ref_logprobs is not None:
            delta = torch.where(valid, ref_logprobs - logprobs, 0.0)  # [N, L]
            kl = torch.exp(delta) - delta - 1  # [N, L]
            if self.beta > 0:
                per_token = per_token + self.beta * kl

        loss = self._aggregate(per_token, mask, num_tokens, totals)
        with torch.no_grad():
            stats = GRPOLossStats(
                policy_loss=self._aggregate(-surrogate, mask, num_tokens, totals),
                kl=None if kl is None else _token_share(kl, mask, tokens),
                clip_low_fraction=_token_share(
                    ((ratio < 1 - self.epsilon_low) & (adv < 0)).to(mask.dtype), mask, tokens
                ),
                clip_high_fraction=_token_share(
                    ((ratio > 1 + self.epsilon_high) & (adv > 0)).to(mask.dtype), mask, tokens
                ),
                ratio_mean=_token_share(ratio, mask, tokens),
            )
        return loss, stats

    def _aggregate(
        self, per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None, totals: StepTotals
    ) -> torch.Tensor:
        """Reduce ``[N, L]`` per-token losses to this batch's share of the step's scalar loss;
        empty completions contribute 0."""
        masked = per_token * mask  # [N, L]
        if self.loss_type == "grpo":
            per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]
            return per_sequence.sum() / max(totals.completions, 1)
        if self.loss_type == "dr_grpo":
            return masked.sum() / (max(totals.completions, 1) * self.max_completion_length)
        if self.loss_type == "dapo" and num_tokens is not None:
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
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [N, L], got shape {tuple(logprobs.shape)}")
        shape = logprobs.shape
        named = {"mask": mask, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
        for name, tensor in named.items():
            if tensor is not None and tensor.shape != shape:
                raise ValueError(
                    f"{name} must match logprobs {tuple(shape)}, got {tuple(tensor.shape)}"
                )
        if advantages.shape != shape[:1]:
            raise ValueError(f"advantages must be [{shape[0]}], got {tuple(advantages.shape)}")
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError(f"beta={self.beta} needs ref_logprobs (or set beta=0)")
        if self.loss_type == "dr_grpo" and shape[1] > self.max_completion_length:
            raise ValueError(
                f"completions of {shape[1]} tokens exceed max_completion_length="
                f"{self.max_completion_length}, the dr_grpo normaliser"
            )
        if num_tokens is not None:
            if self.loss_type != "dapo":
                raise ValueError(
                    f"num_tokens is only used by loss_type 'dapo', not {self.loss_type!r}"
                )
            if not num_tokens > 0:
                raise ValueError(f"num_tokens must be > 0, got {num_tokens!r}")


def _token_share(values: torch.Tensor, mask: torch.Tensor, tokens: float) -> torch.Tensor:
    """Sum of ``[N, L]`` values over the valid tokens / the step's ``tokens``: the token mean's share."""
    return (values * mask).sum() / tokens
