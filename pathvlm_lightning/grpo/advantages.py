"""Group-relative advantages: how much better each completion did than its siblings.

Completions arrive flat, ``[B*G]``, with completion ``i`` answering prompt ``i // G`` (the
:class:`~pathvlm_lightning.grpo.stages.Samples` layout). A NaN reward means every reward callback
abstained on that completion: it is left out of its group's mean and standard deviation and gets
advantage 0, so it neither pushes nor pulls the policy.

The standard deviation is the unbiased one (divide by ``n - 1``), as ``torch.std`` and TRL compute
it; for the binary rewards of G = 4 this makes advantages ``sqrt(3/4)`` times the population-std
version. A group with fewer than two finite rewards has standard deviation 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]
_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    batch_std: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``[B*G]`` advantages ``(r - mean_group) / (std + eps)``.

    Args:
        rewards: ``[B*G]`` total reward per completion; NaN = abstain (advantage 0).
        group_size: G, the completions per prompt.
        scale: ``"group"`` divides by each group's std (GRPO); ``"batch"`` divides the
            group-centred rewards by the std of all finite rewards in the batch (steadier when
            groups are small); ``"none"`` only centres (Dr. GRPO, which argues that the group std
            over-weights nearly solved and nearly hopeless questions).
        eps: added to the std so a zero-variance group gives 0 instead of 0/0.
        batch_std: ``"batch"`` only: the std to divide by when the batch is larger than these
            rewards (the finite rewards of every data-parallel rank); None: the std of
            ``rewards``' own finite entries (:func:`finite_std`).

    >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, scale="none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if batch_std is not None and scale != "batch":
        raise ValueError(f"batch_std is only used by scale 'batch', not {scale!r}")
    valid = ~torch.isnan(grouped)  # [B, G]
    count = valid.sum(dim=1, keepdim=True)  # [B, 1]
    mean = torch.where(valid, grouped, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)  # [B, 1]
    centred = torch.where(valid, grouped - mean, 0.0)  # [B, G]; abstentions -> 0
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = _unbiased_std(centred, count)  # [B, 1]
    elif batch_std is None:
        std = finite_std(grouped[valid])  # []
    else:
        std = torch.as_tensor(batch_std, dtype=grouped.dtype, device=grouped.device)  # []
    return (centred / (std + eps)).reshape(-1)


def finite_std(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the finite entries of ``values``; 0 below two of them. The one std of finite
    rewards (the logged ``reward/total_std``, ``batch`` scaling given no std);
    :func:`global_finite_std` is the same over every data-parallel rank."""
    finite = values[torch.isfinite(values)]  # [n]
    return finite.std() if finite.numel() >= 2 else finite.new_zeros(())


def global_finite_std(values: torch.Tensor, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """:func:`finite_std` over every data-parallel rank's ``values`` [n] (two all-reduces by
    ``reduce``, a strategy's ``reduce(tensor, reduce_op="sum")``).

    Two passes (global mean, then global sum of squared deviations) in float64, so one process
    gets ``torch.std`` up to rounding and ranks with different reward counts are weighed right.
    """
    finite = values[torch.isfinite(values)].to(torch.float64)  # [n] on this rank
    moments = torch.stack([finite.new_tensor(float(finite.numel())), finite.sum()])  # [2]: count, sum
    count, summed = reduce(moments, reduce_op="sum").tolist()
    if count < 2:
        return values.new_zeros(())
    squares = reduce(((finite - summed / count) ** 2).sum(), reduce_op="sum")  # []
    return torch.sqrt(squares / (count - 1)).to(values.dtype)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` bool: True where all finite rewards of a group are equal, so its advantages are all 0
    and it teaches nothing (a group with no finite reward counts as zero-variance too). Used to log
    the fraction of such groups and for dynamic sampling (dropping them from the batch).

    >>> zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 2.0]), group_size=2)
    tensor([ True, False,  True])
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    valid = ~torch.isnan(grouped)  # [B, G]
    low = torch.where(valid, grouped, torch.inf).amin(dim=1)  # [B]
    high = torch.where(valid, grouped, -torch.inf).amax(dim=1)  # [B]
    return (low == high) | ~valid.any(dim=1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Check the flat rewards and view them as ``[B, G]`` floats."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size must be >= 1 and divide the {rewards.numel()} rewards, got {group_size!r}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if torch.isinf(rewards).any():
        raise ValueError(f"rewards must be finite or NaN (abstain), got {rewards.tolist()}")
    return rewards.view(-1, group_size)


def _unbiased_std(centred: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` std with Bessel's correction over the finite entries; 0 below two entries."""
    squares = centred.pow(2).sum(dim=1, keepdim=True)  # [B, 1]
    return torch.sqrt(squares / (count - 1).clamp(min=1))
