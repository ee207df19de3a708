"""One AdamW step of SFT under given precision settings, for ``tests/test_master_weights.py``.

    torchrun --standalone --nproc_per_node 2 tests/dist_precision_worker.py OUT_DIR DATA_DIR SETTINGS_JSON

``SETTINGS_JSON`` maps a run name to ``{"precision", "dtype", "lr", "weight_decay"}``. Every run is
one optimizer step of the embedded tiny model, FSDP2 (``ModelParallelStrategy``, gloo) over the 2
processes, on the 4 records of :func:`write_records` (2 per rank). Rank 0 writes
``OUT_DIR/<name>.pt``: the trainable weights in full before and after the step (float32 copies)
and what the step ran on: the dtype of the sharded weights and of AdamW's states, and the dtype of
the weight the first decoder layer's forward saw. The test runs :func:`one_step` in its own process
for the 1-process twin.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.sharding import fsdp_units, full_state_dict
from pathvlm_lightning.modules import SFTModule
from tests.dist_worker import train_only_data
from tests.test_data_support import pathmmu_rows, write_jsonl
from tests.worker_exit import exit_after_work

RECORDS = 4  # one global batch: 2 per rank, 4 in the 1-process twin


class _ComputeDtype(pl.Callback):
    """The dtype of the first decoder layer's q_proj weight as its forward sees it."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        q_proj = pl_module.backbone.hf_model.model.language_model.layers[0].self_attn.q_proj
        q_proj.register_forward_pre_hook(lambda m, args: self.seen.add(str(m.weight.dtype)))


def _trainable(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The trainable weights in full, as float32 (a collective when sharded; empty off rank 0 there)."""
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    state = full_state_dict(backbone.model) if fsdp_units(backbone.model) else backbone.model.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if k in trainable}


def write_records(data_dir: Path) -> Path:
    """The :data:`RECORDS` questions and their images; written once, before any process reads them."""
    return write_jsonl(data_dir / "records.jsonl", pathmmu_rows(data_dir, RECORDS))


def one_step(settings: dict[str, Any], data_dir: Path, processes: int) -> dict[str, Any]:
    """One AdamW step under ``settings``; FSDP2 over ``processes`` > 1, else one process."""
    pl.seed_everything(0)
    backbone = Backbone(model="embedded-tiny", dtype=settings["dtype"])
    initial = _trainable(backbone)  # before sharding: every rank holds the full model
    optimizer = lambda params: torch.optim.AdamW(  # noqa: E731
        params, lr=settings["lr"], weight_decay=settings["weight_decay"]
    )
    module = SFTModule(backbone, optimizer=optimizer)
    data = train_only_data(data_dir / "records.jsonl", data_dir / f"splits{processes}", RECORDS // processes, module)
    strategy: Any = "auto"
    if processes > 1:
        strategy = ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    compute = _ComputeDtype()
    trainer = pl.Trainer(
        accelerator="cpu", devices=processes, strategy=strategy, precision=settings["precision"], max_steps=1,
        callbacks=[compute], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    states = trainer.optimizers[0].state.values()
    return {
        "initial": initial,
        "final": _trainable(backbone),
        "weight_dtypes": sorted({str(p.dtype) for p in backbone.parameters() if p.requires_grad}),
        "state_dtypes": sorted({str(s[key].dtype) for s in states for key in ("exp_avg", "exp_avg_sq")}),
        "compute_dtypes": sorted(compute.seen),
        "sharded": bool(fsdp_units(backbone.model)),
        "rank": trainer.global_rank,
    }


def main(out_dir: Path, data_dir: Path, runs: dict[str, dict[str, Any]]) -> None:
    for name, settings in runs.items():
        result = one_step(settings, data_dir, processes=2)
        if result["rank"] == 0:
            torch.save(result, out_dir / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
