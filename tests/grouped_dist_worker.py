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

import torch.distributed as dist

from pathvlm_lightning.backbone import Backbone, LoraOptions
from tests.dist_worker import score_prefix_case_sharded
from tests.test_prefix_group import _randomise_lora
from tests.worker_exit import exit_after_work

LORA = LoraOptions(r=4, dropout=0.0)  # dropout would differ per rank


def sharded_family(model: str, out_dir: Path, rank: int, world: int) -> None:
    backbone = Backbone(model=model, lora=LORA, gradient_checkpointing=True)
    _randomise_lora(backbone)  # same seed on every rank, before sharding
    score_prefix_case_sharded(backbone, rank, world, out_dir / f"{model}.pt")


def main(out_dir: Path, models: list[str]) -> None:
    dist.init_process_group("gloo")
    for model in models:
        sharded_family(model, out_dir, dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
