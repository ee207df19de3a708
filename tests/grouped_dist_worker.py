"""The 2-process side of ``tests/test_prefix_group.py::test_fsdp2_every_grouping_family``.

    torchrun --standalone --nproc_per_node 2 tests/grouped_dist_worker.py OUT_DIR MODEL [MODEL ...]

For each embedded twin named, each rank scores 2 of the 4 prompts of
:func:`tests.dist_worker.prefix_case` (padded to its own batch) in the grouped mode on an
FSDP2-sharded backbone with LoRA adapters (seeded, see ``tests/test_prefix_group.py``) and
activation checkpointing; rank 0 writes ``OUT_DIR/<model>.pt`` with every rank's log-probs, the
full gradients and the sharing modes. One launch serves every twin, so the start-up is paid once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from pathvlm_lightning.backbone import Backbone, LoraOptions
from tests.dist_worker import PREFIX_QUESTIONS, grouped_logprobs_and_grads, prefix_case
from tests.test_prefix_group import _randomise_lora

LORA = LoraOptions(r=4, dropout=0.0)  # dropout would differ per rank


def sharded_family(model: str, out_dir: Path, rank: int, world: int) -> None:
    backbone = Backbone(model=model, lora=LORA, gradient_checkpointing=True)
    _randomise_lora(backbone)  # same seed on every rank, before sharding
    backbone.apply_fully_shard(init_device_mesh("cpu", (world,)))
    share = len(PREFIX_QUESTIONS) // world
    inputs, completions = prefix_case(backbone.processor, slice(rank * share, (rank + 1) * share))
    result = grouped_logprobs_and_grads(backbone, inputs, completions, scale=1.0)  # FSDP2 averages over ranks
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"logps": result["logps"], "mode": result["mode"]})
    if rank == 0:
        logps = torch.cat([g["logps"] for g in gathered])  # [4*G, L]: rank order is prompt order
        modes = [g["mode"] for g in gathered]
        torch.save({"logps": logps, "grads": result["grads"], "modes": modes}, out_dir / f"{model}.pt")
    dist.barrier()


def main(out_dir: Path, models: list[str]) -> None:
    dist.init_process_group("gloo")
    for model in models:
        sharded_family(model, out_dir, dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
