"""The KL anchor of GRPO: log-probs of the completions under the reference model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from typing_extensions import override

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.sharding import copy_local_shards, fsdp_units, full_state_dict, mixed_precision_policy
from pathvlm_lightning.callbacks.settings import RecordsArguments
from pathvlm_lightning.grpo.stages import MicroBatch


class ReferenceModelCallback(RecordsArguments, Callback):
    """Computes the reference log-probs [B*G, L] for the KL term (the module calls it; only when beta > 0).

    A part of ``GRPOModule`` (``model.init_args.reference``; null when the loss's beta is 0). The
    module binds it to the policy (:meth:`bind`) when it is built; the
    reference never reads the module.

    With LoRA the reference is the same weights with the adapters disabled: no second copy in memory.
    With full fine-tuning it is a frozen copy of the policy's weights as the stage starts, also on
    resume (the module is rebuilt from the stage's starting folder, and the copy is taken before
    the checkpoint restores the trained policy):

    - one process, DDP, FSDP1: a deep copy built in ``setup``, before Lightning restores a checkpoint;
    - FSDP2 (``ModelParallelStrategy``): no rank ever holds a second full copy. ``setup`` builds the
      copy's skeleton on the meta device and shards it over the policy's mesh with the policy's
      mixed-precision policy, its shards stored in the policy's compute dtype (``bf16-mixed``:
      bfloat16, half the size of the policy's float32 shards); ``on_fit_start`` (after
      ``configure_model`` sharded the policy, before this strategy restores a checkpoint) allocates
      the rank's 1/N shards and copies the policy's local shards into them. The sync then mixes matching shards locally.

    The log-prob pass runs over the step's micro-batch slices (cut once by the module and shared
    with the policy passes).

    Args:
        sync_every_n_steps: if set, every N optimizer steps the reference moves towards the policy:
            ``ref = mix * policy + (1 - mix) * ref`` (full fine-tuning only).
        sync_mix: the mixing coefficient in (0, 1].

    State: the reference weights only once a sync has changed them (otherwise they are rebuilt).
    """

    def __init__(self, sync_every_n_steps: int | None = None, sync_mix: float = 0.6) -> None:
        if sync_every_n_steps is not None and sync_every_n_steps < 1:
            raise ValueError(f"ReferenceModelCallback: sync_every_n_steps must be >= 1 or null, got {sync_every_n_steps!r}")
        if not 0 < sync_mix <= 1:
            raise ValueError(f"ReferenceModelCallback: sync_mix must be in (0, 1], got {sync_mix!r}")
        self.sync_every_n_steps = sync_every_n_steps
        self.sync_mix = sync_mix
        self._reference: Any = None  # a frozen Backbone copy (full fine-tuning only)
        self._needs_weights = False  # a sharded skeleton waiting for the policy's shards
        self._synced = False
        self._policy: Backbone | None = None  # given by the module (bind)

    def bind(self, *, policy: Backbone) -> ReferenceModelCallback:
        """What the reference takes from the module that owns it, given once by that module: the
        ``policy`` it is a frozen copy of (or, with LoRA, the base of). The micro-batch slices come
        with each call (:meth:`reference_logprobs`), cut once per step by the module."""
        self._policy = policy
        return self

    @property
    def policy(self) -> Backbone:
        if self._policy is None:
            raise RuntimeError(
                "ReferenceModelCallback is not bound to a policy: give it to GRPOModule(reference=...), "
                "which binds it (it is no longer listed under trainer.callbacks)"
            )
        return self._policy

    @property
    def uses_adapters(self) -> bool:
        return self._reference is None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = self.policy
        if backbone.has_lora:  # the base model with adapters disabled (sync with LoRA: grpo_settings refuses)
            return
        if self._reference is None:
            sharded = isinstance(trainer.strategy, ModelParallelStrategy)
            if sharded and backbone.hub_kernels:
                raise ValueError(
                    "ReferenceModelCallback: the sharded reference is built on the meta device, which hub kernels "
                    "cannot kernelise; set the backbone's hub_kernels: false (or train with LoRA)"
                )
            self._reference = backbone.build_frozen_copy(on_meta=sharded)
            if sharded:
                mesh = trainer.strategy.device_mesh["data_parallel"]
                policy = mixed_precision_policy(trainer.precision)
                if policy.param_dtype is not None:  # frozen: no master copy needed, keep the shards as gathered
                    for parameter in self._reference.parameters():  # on meta: free; buffers (rotary) stay
                        parameter.data = parameter.data.to(policy.param_dtype)
                self._reference.apply_fully_shard(mesh, policy)
                # Never in backward, so the root must reshard after its forward too: a root left
                # gathered would hold a full copy and miss the syncs, which update the shards.
                for unit in fsdp_units(self._reference):
                    unit.set_reshard_after_forward(True, recurse=False)
                self._needs_weights = True

    @torch.no_grad()
    def reference_logprobs(self, slices: Sequence[MicroBatch]) -> torch.Tensor:
        """[B*G, L] log-probs of the slices' completions under the reference, at sampling temperature."""
        backbone = self.policy
        if self._reference is None:  # under FSDP2 the policy's root stays gathered into its own passes
            with backbone.adapters_disabled():
                logprobs = [_logprobs(backbone, part) for part in slices]
        else:  # under FSDP2 the copy's root (its output layer) is gathered once for all slices
            with self._reference.output_layer_gathered():
                logprobs = [_logprobs(self._reference, part) for part in slices]
        return torch.cat(logprobs)  # [B*G, L]: the slices are consecutive groups

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the copy its weights on the policy's device: the sharded skeleton its 1/N shards of
        the (still unrestored) policy, an unsharded copy a move."""
        if self._reference is None:
            return
        device = trainer.strategy.root_device  # where the strategy put the policy
        if self._needs_weights:
            copy_local_shards(self.policy, self._reference, device)
            self._needs_weights = False
        elif not self._sharded:
            self._reference.to(device)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._reference is None or self.sync_every_n_steps is None:
            return
        if trainer.global_step > 0 and trainer.global_step % self.sync_every_n_steps == 0:
            self._mix_towards(self.policy)

    @torch.no_grad()
    def _mix_towards(self, policy: torch.nn.Module) -> None:
        policy_params = dict(policy.named_parameters())
        for name, ref_param in self._reference.named_parameters():
            ref_param.lerp_(policy_params[name].detach().to(ref_param.dtype), self.sync_mix)
        self._synced = True

    @property
    def _sharded(self) -> bool:
        return self._reference is not None and bool(fsdp_units(self._reference))

    @override
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) weights once synced; when sharded, every rank gathers and rank 0 gets them."""
        if self._reference is None or not self._synced:
            return {"synced": False}
        if self._sharded:
            return {"synced": True, "reference": full_state_dict(self._reference)}
        return {"synced": True, "reference": {k: v.cpu() for k, v in self._reference.state_dict().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("synced") and self._reference is not None:
            if self._sharded:  # every rank reads the full weights and keeps its shards
                full = dict(state_dict["reference"])  # set_model_state_dict swaps shards into the dict it gets
                set_model_state_dict(self._reference, full, options=StateDictOptions(full_state_dict=True))
            else:
                self._reference.load_state_dict(state_dict["reference"])
            self._synced = True


def _logprobs(model: Any, part: MicroBatch) -> torch.Tensor:
    """[n, L] log-probs of one slice's completions under ``model`` (a Backbone)."""
    return model.token_logprobs(
        part.prompt_inputs,
        part.completion_ids,
        num_generations=part.group_size,
        temperature=part.temperature,
        completion_mask=part.completion_mask,
    )
