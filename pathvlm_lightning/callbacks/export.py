"""Writes the trained model as a folder plain ``transformers`` (and vLLM) loads, when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch import Callback
from typing_extensions import override


class ExportCallback(Callback):
    """At the end of ``fit`` export the backbone (LoRA merged, processor included) to ``dirpath``.

    The next stage of a pipeline points its ``backbone.model`` at this folder.
    """

    def __init__(self, dirpath: str) -> None:
        if not dirpath:
            raise ValueError(f"ExportCallback: dirpath must be a folder path, got {dirpath!r}")
        self.dirpath = dirpath

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        # Replicated weights (one process, DDP): rank 0 writes. An FSDP2-sharded model refuses to
        # export in Backbone.export with a message saying so.
        if trainer.is_global_zero:
            pl_module.backbone.export(Path(self.dirpath))
            pl_module.print(f"exported the model to {self.dirpath}")
        trainer.strategy.barrier("export")
