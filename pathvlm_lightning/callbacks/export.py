"""Writes the trained model as a folder plain ``transformers`` (and vLLM) loads, when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy
from typing_extensions import override

from pathvlm_lightning.backbone.export import export_pretrained
from pathvlm_lightning.backbone.sharding import fsdp_units, gather_unsharded


class ExportCallback(Callback):
    """At the end of ``fit`` export the backbone (LoRA merged, processor included) to ``dirpath``.

    The next stage of a pipeline points its ``backbone.model`` at this folder. Replicated weights
    (one process, DDP) are written by rank 0. A sharded model (FSDP2, or Lightning's FSDP1
    strategy) is first gathered by all ranks into a plain copy on rank 0's CPU, which rank 0 writes.

    A fit refuses to start when ``dirpath`` already holds a finished export (its ``config.json``),
    unless ``overwrite`` (``--overwrite_export`` on the command line): a trial run with a reused
    ``run_dir`` must not silently replace a trained model. An interrupted fit has no export yet, so
    resuming it with ``--ckpt_path`` needs nothing more.
    """

    def __init__(self, dirpath: str, overwrite: bool = False) -> None:
        if not dirpath:
            raise ValueError(f"ExportCallback: dirpath must be a folder path, got {dirpath!r}")
        self.dirpath = dirpath
        self.overwrite = overwrite

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        finished = Path(self.dirpath) / "config.json"
        if stage == "fit" and finished.is_file() and not self.overwrite:
            raise FileExistsError(
                f"ExportCallback: {self.dirpath} already holds a finished export ({finished}); this fit would "
                "replace it. Give the run another --run_dir, or pass --overwrite_export true to replace it "
                "(an interrupted run has no export yet: resume it with --ckpt_path <run_dir>/checkpoints/last.ckpt)."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        backbone = pl_module.backbone
        if fsdp_units(backbone.model) or isinstance(trainer.strategy, FSDPStrategy):
            # Every rank takes part in the gather; FSDP1 wraps the whole module, hence the root.
            plain = gather_unsharded(backbone.model, root=trainer.strategy.model, prefix="backbone.model.")
            if plain is not None:
                export_pretrained(plain, backbone.processor, Path(self.dirpath))
        elif trainer.is_global_zero:
            backbone.export(Path(self.dirpath))
        if trainer.is_global_zero:
            pl_module.print(f"exported the model to {self.dirpath}")
        trainer.strategy.barrier("export")
