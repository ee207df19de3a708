"""Finds the GRPO chain among ``trainer.callbacks`` and checks it, so YAML order never matters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning.pytorch import Callback

from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback


@dataclass(frozen=True)
class GRPOChain:
    rollout: RolloutCallback
    rewards: tuple[RewardCallback, ...]  # sorted by name: a fixed order whatever the YAML order
    reference: ReferenceModelCallback | None


def find_chain(callbacks: Sequence[Callback], needs_reference: bool) -> GRPOChain:
    """The rollout, reward and reference callbacks, or a ``ValueError`` saying what is missing."""
    rollouts = [c for c in callbacks if isinstance(c, RolloutCallback)]
    rewards = [c for c in callbacks if isinstance(c, RewardCallback)]
    references = [c for c in callbacks if isinstance(c, ReferenceModelCallback)]
    if len(rollouts) != 1:
        raise ValueError(
            f"GRPO needs exactly one RolloutCallback in trainer.callbacks, found {len(rollouts)}. Add\n"
            "  - class_path: pathvlm_lightning.callbacks.RolloutCallback\n"
            "to trainer.callbacks in your config."
        )
    if not rewards:
        raise ValueError(
            "GRPO needs at least one reward callback in trainer.callbacks (e.g. "
            "pathvlm_lightning.callbacks.FormatReward and pathvlm_lightning.callbacks.AccuracyReward); found none."
        )
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"GRPO: two reward callbacks share the name(s) {duplicates}; give each a distinct `name`.")
    if len(references) > 1:
        raise ValueError(f"GRPO: at most one ReferenceModelCallback, found {len(references)}.")
    if needs_reference and not references:
        raise ValueError(
            "GRPO with beta > 0 needs a ReferenceModelCallback in trainer.callbacks "
            "(pathvlm_lightning.callbacks.ReferenceModelCallback), or set model.init_args.loss.init_args.beta: 0."
        )
    return GRPOChain(
        rollout=rollouts[0],
        rewards=tuple(sorted(rewards, key=lambda r: r.name)),
        reference=references[0] if references else None,
    )
