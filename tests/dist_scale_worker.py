"""The multi-process side of ``tests/test_distributed_scale.py`` (global normalisers, FSDP2 precision
and the sharded reference); the test also imports it for its 1-process twins.

    torchrun --standalone --nproc_per_node 2 tests/dist_scale_worker.py OUT_DIR DATA_DIR

Every rank runs each 2-process run of :data:`RUNS` and writes ``OUT_DIR/<name>.rank<r>.json``
(rank 0 also ``OUT_DIR/<name>.pt``: weights in full, as ``tests/dist_worker.py`` does). Built on
that worker's pieces: the fixed rollout, the step recorder, the trainer settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.sharding import fsdp_units, full_state_dict
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback, RewardCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.advantages import finite_std
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule, SFTModule
from tests.dist_worker import STEPS, FixedRollout, StepRecorder, _trainable_weights, _trainer_args, train_only_data
from tests.test_data_support import pathmmu_rows, write_jsonl
from tests.worker_exit import exit_after_work


def write_uneven_records(folder: Path) -> Path:
    """16 questions whose SFT targets differ in length (1-5 filler sentences), so ranks hold
    different label-token counts at every step."""
    rows = pathmmu_rows(folder, 16)
    for i, row in enumerate(rows):
        row["explanation"] += " The chromatin is dense." * (i % 5)
    return write_jsonl(folder / "records.jsonl", rows)


class RecordReward(RewardCallback):
    """A record-dependent scale (id mod 4) times the completion's length: groups differ in spread,
    so one rank's reward std is not the global batch's."""

    default_name = "record"

    def score_text(self, completion: str, record: VQARecord) -> float:
        return (1 + int(record.id[1:]) % 4) * len(completion) / 10


def _trainer(strategy: str, callbacks: list[pl.Callback], max_steps: int = STEPS, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        **_trainer_args(strategy),
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(kwargs.pop("enable_checkpointing", False)),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)  # any gradient difference shows in the weights


def _save(name: str, out_dir: Path, trainer: pl.Trainer, initial: dict, backbone: Backbone) -> None:
    weights = {"initial." + k: v for k, v in initial.items()}
    weights.update({"final." + k: v for k, v in _trainable_weights(backbone).items()})
    if trainer.global_rank == 0:
        torch.save(weights, out_dir / f"{name}.pt")


def sft_uneven(name: str, strategy: str, batch_size: int, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """SFT on targets of different lengths: the loss must be the global label-token mean."""
    pl.seed_everything(0)
    module = SFTModule(Backbone(), optimizer=_sgd)
    recorder = StepRecorder()
    counts: list[int] = []
    trainer = _trainer(strategy, [recorder, _LabelCounts(counts)])
    initial = _trainable_weights(module.backbone)
    data = train_only_data(write_uneven_records(data_dir), data_dir / "splits", batch_size, module)
    trainer.fit(module, datamodule=data)
    _save(name, out_dir, trainer, initial, module.backbone)
    return {"losses": recorder.losses, "grad_norms": [], "record_ids": recorder.record_ids, "label_tokens": counts}


class _LabelCounts(pl.Callback):
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: dict, batch_idx: int) -> None:
        self.counts.append(int((batch["labels"][:, 1:] != -100).sum()))


def grpo_batch_scaled(name: str, strategy: str, batch_size: int, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """GRPO with ``scale_rewards: batch`` (global std), dapo, and micro-batches of one group."""
    pl.seed_everything(0)
    module = GRPOModule(
        Backbone(), FixedRollout(), [FormatReward(), AccuracyReward(), RecordReward()], optimizer=_sgd,
        loss=GRPOLoss(aggregation="dapo", beta=0.0), scale_rewards="batch", micro_batch_size=4,
    )  # fmt: skip
    advantages: dict[str, list[float]] = {}
    local_stds: list[float] = []
    make_rollout = module.make_rollout

    def recording(batch: dict) -> Any:
        scored, slices = make_rollout(batch)
        local_stds.append(float(finite_std(scored.total)))
        for i, record in enumerate(scored.samples.records):
            advantages[record.id] = scored.advantages[i * 4 : (i + 1) * 4].tolist()
        return scored, slices

    module.make_rollout = recording
    recorder = StepRecorder()
    trainer = _trainer(strategy, [recorder])
    initial = _trainable_weights(module.backbone)
    trainer.fit(module, datamodule=train_only_data(_records(data_dir), data_dir / "splits", batch_size, module))
    _save(name, out_dir, trainer, initial, module.backbone)
    return {
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "record_ids": recorder.record_ids,
        "advantages": advantages,
        "local_reward_stds": local_stds,
    }


def _records(data_dir: Path) -> Path:
    return write_jsonl(data_dir / "records.jsonl", pathmmu_rows(data_dir, 16))


# ---------------------------------------------------------------- FSDP2: precision and reference
@contextmanager
def collective_dtypes() -> Iterator[dict[str, list[str]]]:
    """The dtypes of the tensors FSDP2 all-gathers and reduce-scatters inside the block (by name).

    FSDP2 looks its collectives up on ``torch.distributed`` at call time, so wrapping them there
    sees each one; only tensors of more than 64 elements count (not Lightning's scalar reduces).
    """
    seen: dict[str, list[str]] = {"all_gather": [], "reduce_scatter": [], "all_reduce": []}
    names = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
             "all_reduce": "all_reduce"}
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def wrap(name: str, original: Callable) -> Callable:
        def recording(*args: Any, **kwargs: Any) -> Any:
            if name == "all_reduce":  # in place
                tensor = args[0] if args else kwargs.get("tensor")
            else:  # (output, input, ...), by position or name
                tensor = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 64:
                seen[names[name]].append(str(tensor.dtype))
            return original(*args, **kwargs)

        return recording

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class _ForwardDtypes(pl.Callback):
    """The dtype of the first decoder layer's q_proj weight as its forward sees it (policy and
    reference), and the dtype of the policy's (sharded) gradients before each optimizer step."""

    def __init__(self, reference: ReferenceModelCallback) -> None:
        self.reference = reference
        self.seen: dict[str, set[str]] = {"policy": set(), "reference": set(), "grad": set()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        for key, backbone in (("policy", pl_module.backbone), ("reference", self.reference._reference)):
            q_proj = backbone.hf_model.model.language_model.layers[0].self_attn.q_proj
            q_proj.register_forward_pre_hook(lambda m, args, key=key: self.seen[key].add(str(m.weight.dtype)))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.seen["grad"] |= {str(p.grad.dtype) for p in pl_module.parameters() if p.grad is not None}


def fsdp2_bf16(name: str, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """GRPO, full fine-tuning with a sharded reference, FSDP2 under ``bf16-mixed``."""
    pl.seed_everything(0)
    reference = ReferenceModelCallback()
    module = GRPOModule(Backbone(), FixedRollout(), [FormatReward(), AccuracyReward()], reference, optimizer=_sgd,
                        loss=GRPOLoss(beta=0.04))
    dtypes = _ForwardDtypes(reference)
    trainer = _trainer("fsdp2", [dtypes], 1, precision="bf16-mixed")
    with collective_dtypes() as collectives:
        trainer.fit(module, datamodule=train_only_data(_records(data_dir), data_dir / "splits", 1, module))
    local = sum(p.to_local().numel() for p in reference._reference.parameters())
    total = sum(p.numel() for p in reference._reference.parameters())
    return {
        "forward_dtypes": {k: sorted(v) for k, v in dtypes.seen.items()},
        "collectives": {k: sorted(set(v)) for k, v in collectives.items()},
        "reference_local_fraction": local / total,
        "reference_shard_dtypes": sorted({str(p.dtype) for p in reference._reference.parameters()}),
    }


def fsdp2_reference_resume(name: str, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """2 steps with a checkpoint, then a fresh fit resumed from it for 1 more: the sharded
    reference must hold the starting weights, not the checkpoint's trained policy."""
    path = _records(data_dir)
    ckpt_dir = out_dir / f"{name}.ckpt"
    fits: list[tuple[GRPOModule, ReferenceModelCallback]] = []
    for max_steps, ckpt_path in ((2, None), (3, ckpt_dir / "step=2.ckpt")):
        pl.seed_everything(0)
        reference = ReferenceModelCallback()
        module = GRPOModule(Backbone(), FixedRollout(), [FormatReward(), AccuracyReward()], reference, optimizer=_sgd,
                            loss=GRPOLoss(beta=0.04))
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        callbacks = [checkpoint]
        trainer = _trainer("fsdp2", callbacks, max_steps, enable_checkpointing=True)
        trainer.fit(module, datamodule=train_only_data(path, data_dir / "splits", 1, module), ckpt_path=ckpt_path)
        fits.append((module, reference))
    (_, first_reference), (resumed, reference) = fits
    weights = {
        "reference." + k: v for k, v in full_state_dict(reference._reference).items()  # a collective
    }
    weights.update({"policy." + k: v for k, v in full_state_dict(resumed.backbone).items()})
    weights.update({"first_reference." + k: v for k, v in full_state_dict(first_reference._reference).items()})
    if dist.get_rank() == 0:
        torch.save(weights, out_dir / f"{name}.pt")
    return {"sharded": bool(fsdp_units(reference._reference)), "global_step": resumed.global_step}


TWO_PROCESS: dict[str, Callable[..., dict[str, Any]]] = {
    "sft_uneven_ddp": lambda name, d, o: sft_uneven(name, "ddp", 2, d, o),
    "grpo_batch_scaled_ddp": lambda name, d, o: grpo_batch_scaled(name, "ddp", 2, d, o),
    "fsdp2_bf16": fsdp2_bf16,
    "fsdp2_reference_resume": fsdp2_reference_resume,
}


def main(out_dir: Path, data_dir: Path) -> None:
    for name, run in TWO_PROCESS.items():
        record = run(name, data_dir / name, out_dir)
        (out_dir / f"{name}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
