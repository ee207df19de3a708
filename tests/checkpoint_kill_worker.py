"""A small fit that saves ``last.ckpt`` after every step and SIGKILLs itself inside one save (helpers
for tests/test_checkpoint_atomic.py; no tests here).

``python tests/checkpoint_kill_worker.py ROOT MOMENT`` fits 3 steps with checkpoints in
``ROOT/ckpt``; during the second save it kills itself at ``MOMENT`` (one of :data:`MOMENTS`), so
the first save's ``last.ckpt`` (global step 1) is what a crash there must leave. The kill is placed
by wrapping the calls the writer makes, so the moments are exact, not timed.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

import pathvlm_lightning.checkpoint_io as checkpoint_io

#: where the second save is killed: after its first byte, half-way through the file, before the
#: file is flushed to disk, before the rename, and after the rename (before the folder is flushed)
MOMENTS = ("first_byte", "half_written", "before_fsync", "before_rename", "after_rename")
KILLED_SAVE = 2


class WideModel(BoringModel):
    """BoringModel with a 1 MB weight, so a checkpoint is written in many pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 8192)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()


def build_trainer(root: Path, max_steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)],
    )
    return checkpoint_io.use_atomic_checkpoints(trainer)


def fit(root: Path, max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = build_trainer(root, max_steps)
    trainer.fit(WideModel(), ckpt_path=ckpt_path)
    return trainer


def arm(moment: str) -> None:
    """Wrap the writer's calls so that the ``KILLED_SAVE``-th save dies at ``moment``."""
    saves = 0
    save_checkpoint = checkpoint_io.AtomicCheckpointIO.save_checkpoint
    torch_save, fsync, replace = torch.save, os.fsync, os.replace

    def die_at(now: str) -> None:
        if saves == KILLED_SAVE and now == moment:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted_save(self, *args, **kwargs):
        nonlocal saves
        saves += 1
        return save_checkpoint(self, *args, **kwargs)

    def partial_torch_save(obj, file, *args, **kwargs):
        if saves == KILLED_SAVE and moment in ("first_byte", "half_written"):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            file.write(data[: 1 if moment == "first_byte" else len(data) // 2])
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return torch_save(obj, file, *args, **kwargs)

    def checked_fsync(descriptor):
        die_at("before_fsync")
        return fsync(descriptor)

    def checked_replace(source, target):
        die_at("before_rename")
        result = replace(source, target)
        die_at("after_rename")
        return result

    checkpoint_io.AtomicCheckpointIO.save_checkpoint = counted_save
    checkpoint_io.torch.save = partial_torch_save
    checkpoint_io.os.fsync = checked_fsync
    checkpoint_io.os.replace = checked_replace


if __name__ == "__main__":
    root, moment = Path(sys.argv[1]), sys.argv[2]
    assert moment in MOMENTS, moment
    arm(moment)
    fit(root, max_steps=3)
    sys.exit("the armed save did not run")
