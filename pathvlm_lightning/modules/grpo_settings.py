"""Every check of GRPOModule's arguments, one against another, in one function with clear messages.

The module calls :func:`check_grpo_settings` in its constructor, so a config that cannot train stops
when it is read (``fit``, ``--print_config`` aside), before a model is loaded onto a device or a
batch is drawn. Each message names the setting as YAML spells it and says what to write instead.
"""

from __future__ import annotations

from typing import Any

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback
from pathvlm_lightning.grpo.losses import PolicyLoss

SCALE_REWARDS = ("group", "batch", "none")
_ARGS = "model.init_args"


class GRPOSettingsError(ValueError):
    """GRPOModule's arguments do not fit together; the message names them and the fix."""


def check_grpo_settings(
    *,
    backbone: Backbone,
    rollout: Any,
    rewards: Any,
    reference: Any,
    loss: Any,
    scale_rewards: str,
    num_iterations: int,
    max_grad_norm: float | None,
    micro_batch_size: int | None,
) -> None:
    """Raise :class:`GRPOSettingsError` (a ``ValueError``) for the first setting that is wrong alone or
    does not fit the others."""
    # the parts are what they are declared as (Python callers get no type check from the config parser)
    if not isinstance(rollout, RolloutCallback):
        raise GRPOSettingsError(
            f"GRPOModule: rollout must be a RolloutCallback ({_ARGS}.rollout.class_path: "
            f"pathvlm_lightning.callbacks.RolloutCallback), got {type(rollout).__name__}"
        )
    if not isinstance(rewards, (list, tuple)) or not rewards:
        raise GRPOSettingsError(
            f"GRPOModule: rewards must be a non-empty list of reward callbacks ({_ARGS}.rewards, e.g. "
            f"pathvlm_lightning.callbacks.FormatReward and AccuracyReward), got {rewards!r}"
        )
    wrong = [type(r).__name__ for r in rewards if not isinstance(r, RewardCallback)]
    if wrong:
        raise GRPOSettingsError(
            f"GRPOModule: every entry of {_ARGS}.rewards must be a RewardCallback subclass; got {wrong}"
        )
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GRPOSettingsError(
            f"GRPOModule: two rewards share the name(s) {duplicates} (each is logged as reward/<name>); "
            "give each a distinct init_args.name"
        )
    if reference is not None and not isinstance(reference, ReferenceModelCallback):
        raise GRPOSettingsError(
            f"GRPOModule: reference must be a ReferenceModelCallback or null, got {type(reference).__name__}"
        )
    if not isinstance(loss, PolicyLoss):
        raise GRPOSettingsError(
            f"GRPOModule: loss must be a PolicyLoss (pathvlm_lightning.grpo.losses), got {type(loss).__name__}"
        )
    # the module's own numbers
    if scale_rewards not in SCALE_REWARDS:
        raise GRPOSettingsError(f"GRPOModule: scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if not (isinstance(num_iterations, int) and num_iterations >= 1):
        raise GRPOSettingsError(f"GRPOModule: num_iterations must be an integer >= 1, got {num_iterations!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise GRPOSettingsError(f"GRPOModule: max_grad_norm must be > 0 or null, got {max_grad_norm!r}")
    if micro_batch_size is not None and not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
        raise GRPOSettingsError(
            f"GRPOModule: micro_batch_size counts completions and must be an integer >= 1 or null, "
            f"got {micro_batch_size!r}"
        )
    # one against another
    group = rollout.num_generations
    if micro_batch_size is not None and micro_batch_size % group:
        raise GRPOSettingsError(
            f"GRPOModule: micro_batch_size={micro_batch_size} must be a multiple of the rollout's "
            f"num_generations={group}, so that each group's prompt stays in one pass (e.g. {group} or {2 * group})"
        )
    if loss.needs_reference and reference is None:
        raise GRPOSettingsError(
            f"GRPOModule: the loss's beta={loss.beta} weighs a KL term to a reference model, and "
            f"{_ARGS}.reference is null. Either add\n"
            f"    reference:\n      class_path: pathvlm_lightning.callbacks.ReferenceModelCallback\n"
            f"under {_ARGS}, or set {_ARGS}.loss.init_args.beta: 0"
        )
    if not loss.needs_reference and reference is not None:
        raise GRPOSettingsError(
            f"GRPOModule: the loss's beta is 0, so no reference model is used, but {_ARGS}.reference names one "
            f"(it would build a frozen copy for nothing). Set {_ARGS}.reference: null, or a beta > 0"
        )
    if reference is not None and reference.sync_every_n_steps is not None and backbone.has_lora:
        raise GRPOSettingsError(
            f"GRPOModule: {_ARGS}.reference.init_args.sync_every_n_steps={reference.sync_every_n_steps} moves a "
            "separate reference copy towards the policy, but with LoRA the reference is the base model with the "
            "adapters disabled (no copy). Set sync_every_n_steps: null, or train without LoRA"
        )
    bound = loss.max_completion_length
    if loss.aggregation == "dr_grpo" and bound is not None and bound != rollout.max_new_tokens:
        raise GRPOSettingsError(
            f"GRPOModule: the dr_grpo loss divides by max_completion_length={bound}, bound to another rollout, but "
            f"this rollout samples up to max_new_tokens={rollout.max_new_tokens}; give each module its own loss"
        )
