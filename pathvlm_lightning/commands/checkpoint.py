"""Rebuilding a stage's LightningModule from its YAML and loading a Lightning checkpoint into it.

The module is built exactly as ``fit`` built it, by the project's LightningCLI from the stage's
``model`` section, so a checkpoint's keys meet the same backbone, LoRA layout and dtype. Only the
parts that cannot matter for a forward pass are overridden: the trainer runs on one CPU process
with no logger and no callbacks (a paper-scale config names four GPUs and, for the process reward,
a judge whose key need not be set to read weights).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Trainer settings that make any stage config instantiable on one CPU process.
_PLAIN_TRAINER = (
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the given config; the message says why and what to do."""


def load_stage_module(
    config: str | Path, checkpoint: str | Path, *, base_model: str | None = None, dtype: str | None = None
) -> Any:
    """The stage's LightningModule with the checkpoint's weights, in eval mode on the CPU.

    ``base_model`` replaces the config's ``backbone.model`` (architecture and processor come from
    it; every weight is then overwritten), e.g. when the config names a folder of another machine.
    ``dtype`` replaces the backbone's dtype.
    """
    from pathvlm_lightning.cli import main

    checkpoint = Path(checkpoint)
    state = _read_state_dict(checkpoint)
    args = ["--config", str(config), *_PLAIN_TRAINER]
    if base_model is not None:
        args.append(f"--model.init_args.backbone.init_args.model={base_model}")
    if dtype is not None:
        args.append(f"--model.init_args.backbone.init_args.dtype={dtype}")
    with _quiet("lightning.pytorch", "lightning.fabric"):  # cli.main itself silences the args-parameter warning
        module = main(args=args, run=False).model  # the throwaway trainer's banner is not logged
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint} does not fit the model {config} builds: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}. Was it written by a "
            "fit with this config (same backbone, LoRA settings and module)?"
        )
    return module.eval()


def _read_state_dict(checkpoint: Path) -> dict[str, Any]:
    import torch

    if checkpoint.is_dir():
        raise CheckpointError(
            f"{checkpoint} is a sharded (distributed) checkpoint folder; consolidate it into one file first: "
            f"python -m lightning.fabric.utilities.consolidate_checkpoint {checkpoint} "
            f"(writes {checkpoint}.consolidated), then pass that file"
        )
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not exist")
    # weights_only: tensors, containers and numbers are all a stage checkpoint holds (weights, loop
    # and callback state, hyperparameters); anything else in the pickle is refused, not run.
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{checkpoint} holds objects other than tensors and plain values, so it is not loaded "
            f"(torch.load weights_only): {str(error).splitlines()[0]}"
        ) from None
    state = content.get("state_dict") if isinstance(content, dict) else None
    if not isinstance(state, dict):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{checkpoint} has no 'state_dict' (found {found}): not a Lightning checkpoint")
    return state


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING inside the block (their INFO lines are about the trainer)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

