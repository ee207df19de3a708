"""Peak host memory per rank of GRPO full fine-tuning under FSDP2, with and without the reference.

    python benchmarks/reference_rss.py [--model embedded-small] [--processes 2] [--json out.json]

Each variant is its own ``torchrun`` launch of this file (CPU, gloo, ``ModelParallelStrategy`` with
``fully_shard`` as ``tests/test_distributed.py`` runs it), so every process's peak RSS belongs to
one variant. A rank resets its peak (``/proc/self/clear_refs``) once the imports are done, then
builds the backbone and fits 2 GRPO steps (8 new tokens, G=4, one prompt per rank); it reports
three figures, each minus the RSS at that reset: the peak (``VmHWM``) when training starts (the
policy loaded and sharded, the reference built: the construction's peak), the RSS then (what the
rank keeps), and the peak over the whole fit (rollouts and reference passes included).

- ``policy``: ``beta: 0``, no reference at all (the floor);
- ``reference``: ``beta: 0.04``, the reference as ``ReferenceModelCallback`` builds it: a meta
  skeleton sharded like the policy, filled with the policy's local shards;
- ``reference_host_copy``: the same, built the way it was before: a full host deep copy of the
  policy on every rank, then sharded (the baseline the sharded build replaces).

The weights' size (float32) is printed next to the figures: ``reference_host_copy`` should cost
about one full copy over ``policy``, ``reference`` about 1/world_size of one. Host memory on a
shared machine moves with the allocator's mood by a few MiB: compare the variants of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS = ("policy", "reference", "reference_host_copy")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(variant: str, model: str, out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pathvlm_lightning.backbone import Backbone
    from pathvlm_lightning.backbone.sharding import fsdp_units
    from pathvlm_lightning.callbacks import ReferenceModelCallback, RewardCallback, RolloutCallback
    from pathvlm_lightning.data import VQADataModule
    from pathvlm_lightning.grpo.losses import GRPOLoss
    from pathvlm_lightning.modules import GRPOModule

    class LengthReward(RewardCallback):
        default_name = "length"

        def score_text(self, completion: str, record: Any) -> float:
            return len(completion) / 10

    class TrainStart(pl.Callback):
        """Peak and current RSS (KiB) when training starts: everything built, no step run yet."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.peak, self.current = _status_kib("VmHWM"), _status_kib("VmRSS")

    class HostCopyReference(ReferenceModelCallback):
        """The reference as it was built before: a full deep copy on every rank, then sharded."""

        def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
            self._reference = self.policy.build_frozen_copy()
            self._reference.apply_fully_shard(trainer.strategy.device_mesh["data_parallel"])
            for unit in fsdp_units(self._reference):
                unit.set_reshard_after_forward(True, recurse=False)

    rank = int(os.environ["RANK"])
    data = out / "data"  # written by the launcher
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start_kib = _status_kib("VmRSS")

    pl.seed_everything(0)
    backbone = Backbone(model=model)
    weights_mib = sum(p.numel() * 4 for p in backbone.parameters()) / 2**20
    beta = 0.0 if variant == "policy" else 0.04
    reference = {"policy": None, "reference": ReferenceModelCallback(),
                 "reference_host_copy": HostCopyReference()}[variant]
    module = GRPOModule(backbone, RolloutCallback(num_generations=4, max_new_tokens=8), [LengthReward()], reference,
                        optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), loss=GRPOLoss(beta=beta),
                        log_completions_every_n_steps=0)
    start = TrainStart()
    callbacks: list[pl.Callback] = [start]
    processes = int(os.environ["WORLD_SIZE"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=processes, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        strategy=ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1),
    )
    datamodule = VQADataModule(
        data_path=str(data / "records.jsonl"), split_dir=str(out / "splits"), split_sizes={"train": None},
        train_split="train", val_split=None, test_split="train", predict_split="train", batch_size=1, batch_kind="prompt", processor=backbone.processor,
    )
    trainer.fit(module, datamodule=datamodule)
    record: dict[str, Any] = {
        "variant": variant,
        "rank": rank,
        "built_peak_mib": (start.peak - start_kib) / 1024,
        "built_rss_mib": (start.current - start_kib) / 1024,
        "fit_peak_mib": (_status_kib("VmHWM") - start_kib) / 1024,
        "weights_mib": weights_mib,
    }
    if reference is not None:
        params = list(reference._reference.parameters())
        record["reference_local_fraction"] = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
    (out / f"{variant}.rank{rank}.json").write_text(json.dumps(record))


def launch(variant: str, model: str, processes: int, out: Path) -> list[dict[str, Any]]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", variant, "--model", model, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{result.stderr[-4000:]}")
    return [json.loads((out / f"{variant}.rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded-small")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.out)
        return
    from pathvlm_lightning.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "data", 16, 0)
        results = {v: launch(v, args.model, args.processes, Path(tmp)) for v in VARIANTS}
    weights = results["policy"][0]["weights_mib"]
    print(f"model {args.model}: weights {weights:.1f} MiB (float32), {args.processes} processes (gloo, FSDP2)")
    print("MiB per rank over the RSS after imports; (+x.xx) = over policy-only, in full weight copies")
    print(f"{'variant':<21} {'built: peak':<28} {'built: kept':<28} {'whole fit: peak':<28}")
    for variant, ranks in results.items():
        cells = []
        for key in ("built_peak_mib", "built_rss_mib", "fit_peak_mib"):
            cell = ", ".join(
                f"{r[key]:6.1f} ({(r[key] - f[key]) / weights:+.2f})" for r, f in zip(ranks, results["policy"])
            )
            cells.append(f"{cell:<28}")
        print(f"{variant:<21} {' '.join(cells)}")
    summary = {"model": args.model, "processes": args.processes, "weights_mib": weights, "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
