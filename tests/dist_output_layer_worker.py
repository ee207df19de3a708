"""The 2-process side of ``tests/test_output_layer_sharded.py``: the output layer under FSDP2, gathered once per step.

    torchrun --standalone --nproc_per_node 2 tests/dist_output_layer_worker.py OUT_DIR DATA_DIR

Two parts, one launch (process start-up is most of the cost on 2 cores):

- ``passes``: a sharded, fully trained backbone (tied embedding = output layer) scores two one-prompt
  slices per rank, forward and backward each, inside ``Backbone.output_layer_gathered()`` and again
  without it; a frozen sharded copy (the full fine-tuning reference, root resharding after forward)
  scores the same slices without gradient, inside and outside the block. Rank 0 writes
  ``OUT_DIR/passes.pt``: log-probs of all ranks, full gradients, and the count of real all-gathers
  of each root unit and of output-layer ``full_tensor`` calls.
- ``fit``: :func:`run_fit`, 2 GRPO steps of full fine-tuning with the frozen reference under
  ``ModelParallelStrategy``, 2 prompts per rank in two micro-batch slices of one group; per step
  the same counts. Rank 0 writes ``OUT_DIR/fit.pt`` (losses, counts, final weights); the test runs
  the 1-process twin itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.tensor import DTensor

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.sharding import copy_local_shards, fsdp_units
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule
from tests.dist_worker import (
    NUM_GENERATIONS,
    PREFIX_GENERATIONS,
    FixedRollout,
    prefix_case,
    train_only_data,
    write_records,
)
from tests.worker_exit import exit_after_work

FIT_STEPS = 2


# ---------------------------------------------------------------- counting
def _root_group(model: torch.nn.Module) -> FSDPParamGroup:
    """The parameter group of the FSDP2 root unit of ``model`` (embeddings, output layer, norms, merger)."""
    units = fsdp_units(model)
    nested = {id(m) for u in units for m in u.modules() if m is not u and isinstance(m, FSDPModule)}
    (root,) = [unit for unit in units if id(unit) not in nested]
    state = root._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
    return groups[0]


@contextmanager
def counted_gathers(models: dict[str, torch.nn.Module], head_shape: torch.Size) -> Iterator[dict[str, int]]:
    """Inside the block: real all-gathers of each model's root unit (an ``unshard`` that is not a
    no-op), and ``full_tensor`` calls on an output-layer-shaped DTensor (``"full_tensor"``)."""
    groups = {name: _root_group(model) for name, model in models.items()}
    counts = dict.fromkeys([*groups, "full_tensor"], 0)
    unshard, full_tensor = FSDPParamGroup.unshard, DTensor.full_tensor

    def counting_unshard(self: FSDPParamGroup, async_op: bool = False) -> Any:
        if self._all_gather_result is None and not self.is_unsharded:
            for name, group in groups.items():
                counts[name] += self is group
        return unshard(self, async_op)

    def counting_full_tensor(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counts["full_tensor"] += self.shape == head_shape
        return full_tensor(self, *args, **kwargs)

    FSDPParamGroup.unshard, DTensor.full_tensor = counting_unshard, counting_full_tensor
    try:
        yield counts
    finally:
        FSDPParamGroup.unshard, DTensor.full_tensor = unshard, full_tensor


# ---------------------------------------------------------------- part 1: log-prob passes
def one_prompt_slices(processor: Any, prompts: range) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """One slice per prompt of :func:`tests.dist_worker.prefix_case` (G completions each)."""
    return [prefix_case(processor, slice(i, i + 1)) for i in prompts]


def slice_passes(backbone: Backbone, slices: list, scale: float, grad: bool) -> torch.Tensor:
    """Log-probs [sum of B*G, L] of each slice (masked to 0 after EOS); with ``grad``, the backward of
    ``scale`` x their sum over real tokens, slice by slice."""
    rows = []
    for inputs, completions in slices:
        mask, _ = backbone.completion_mask(completions)  # [G, L]
        with torch.set_grad_enabled(grad):
            logps = backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)  # [G, L]
        if grad:
            (scale * logps[mask == 1].sum()).backward()
        rows.append(logps.detach().masked_fill(mask == 0, 0.0))
    return torch.cat(rows)


def full_gradients(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Every parameter's gradient in full (a collective under FSDP2)."""
    grads = {}
    for name, parameter in backbone.model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return grads


def sharded_passes(out_dir: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    pl.seed_everything(0)
    policy = Backbone()  # full fine-tuning; the embedded tiny model ties lm_head to the embedding
    reference = policy.build_frozen_copy(on_meta=True)
    policy.apply_fully_shard(mesh)
    reference.apply_fully_shard(mesh)
    for unit in fsdp_units(reference):  # as ReferenceModelCallback.setup does
        unit.set_reshard_after_forward(True, recurse=False)
    copy_local_shards(policy, reference, torch.device("cpu"))
    slices = one_prompt_slices(policy.processor, range(2 * rank, 2 * rank + 2))
    head = policy.hf_model.get_output_embeddings().weight.shape
    models = {"policy": policy.model, "reference": reference.model}
    result: dict[str, Any] = {}
    for scoped in (True, False):
        key = "scoped" if scoped else "unscoped"
        policy.zero_grad(set_to_none=True)
        with counted_gathers(models, head) as counts:
            with policy.output_layer_gathered() if scoped else _nothing():
                logps = slice_passes(policy, slices, scale=1.0, grad=True)  # FSDP2 averages over ranks
        result[f"policy_{key}"] = {"counts": dict(counts), "grads": full_gradients(policy), "logps": _all(logps)}
        with counted_gathers(models, head) as counts:
            with reference.output_layer_gathered() if scoped else _nothing():
                logps = slice_passes(reference, slices, scale=1.0, grad=False)
        result[f"reference_{key}"] = {"counts": dict(counts), "logps": _all(logps)}
    result["policy_resharded"] = all(isinstance(p, DTensor) for p in policy.model.parameters())
    result["reference_resharded"] = all(isinstance(p, DTensor) for p in reference.model.parameters())
    if rank == 0:
        torch.save(result, out_dir / "passes.pt")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _all(logps: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order (= prompt order)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, logps)
    return torch.cat(gathered)


# ---------------------------------------------------------------- part 2: GRPO steps under Lightning
class GatherCounter(pl.Callback):
    """Per training step: real all-gathers of the policy's and the reference copy's root units, and
    output-layer ``full_tensor`` calls (the rollout is fixed: no generation gathers)."""

    def __init__(self, reference: ReferenceModelCallback) -> None:
        self.reference = reference
        self.steps: list[dict[str, int]] = []
        self._block: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        models = {"policy": pl_module.backbone.model, "reference": self.reference._reference.model}
        head = pl_module.backbone.hf_model.get_output_embeddings().weight.shape
        self._block = counted_gathers(models, head)
        self._counts = self._block.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._block.__exit__(None, None, None)
        self.steps.append(dict(self._counts))


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def run_fit(data_dir: Path, processes: int) -> dict[str, Any]:
    """:data:`FIT_STEPS` GRPO steps, full fine-tuning, beta 0.04 (frozen reference), 2 prompts per
    process in slices of one group (``micro_batch_size`` = G); SGD, so weights move by lr x gradient."""
    pl.seed_everything(0)
    backbone = Backbone()
    reference = ReferenceModelCallback()
    module = GRPOModule(
        backbone, FixedRollout(), [FormatReward(), AccuracyReward()], reference, optimizer=partial(torch.optim.SGD, lr=0.1),
        loss=GRPOLoss(beta=0.04), micro_batch_size=NUM_GENERATIONS,
    )  # fmt: skip
    losses = LossRecorder()
    callbacks: list[pl.Callback] = [losses]
    if processes > 1:
        counter = GatherCounter(reference)
        callbacks.append(counter)
        strategy: dict[str, Any] = {"strategy": ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)}
    else:
        strategy = {}
    data = train_only_data(write_records(data_dir), data_dir / "splits", 2 * 2 // processes, module)  # 4 prompts a step
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=processes,
        **strategy,
        max_steps=FIT_STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    weights = {}
    for name, parameter in backbone.model.named_parameters():
        weights[name] = (parameter.full_tensor() if isinstance(parameter, DTensor) else parameter).detach().clone()
    result: dict[str, Any] = {"losses": losses.losses, "weights": weights}
    if processes > 1:
        result["counts"] = counter.steps
    return result


def main(out_dir: Path, data_dir: Path) -> None:
    dist.init_process_group("gloo")
    sharded_passes(out_dir)
    dist.barrier()
    result = run_fit(data_dir, processes=dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(result, out_dir / "fit.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
