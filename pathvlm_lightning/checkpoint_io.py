"""Checkpoint files that a crash cannot destroy, and a clear error when one cannot be read.

Lightning's default writer serialises into memory and lets ``fsspec`` move a temporary file into
place; with the temporary folder (``TMPDIR``) on another filesystem that move is a copy, so a kill
during it leaves a truncated ``last.ckpt`` and the previous good one is gone. Here a checkpoint is
written to a hidden temporary file in the checkpoint's own folder, flushed to disk, renamed over the
target (atomic on POSIX and Windows within one filesystem) and the folder entry flushed too: at any
moment the target is either the previous complete file or the new complete file. Temporaries left
by a killed save are removed by the next save into the same folder.

Only single-file checkpoints pass through a ``CheckpointIO`` (single device, DDP, and FSDP or
ModelParallel with ``save_distributed_checkpoint=False``). Distributed checkpoints (a folder of
shards written by ``torch.distributed.checkpoint``) are saved and loaded by the strategy itself;
``checkpoint_sharded.py`` makes those atomic.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

#: ``.<name>.<pid>.<random>.partial``: a checkpoint being written (or left by a killed save)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.partial$")


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded; the message names it and the alternatives."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic (see the module docstring) and whose
    loads name the damaged file and the other checkpoints of its folder. Remote paths (``s3://``...)
    are left to the parent class."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        temporary = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(folder)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch.load on a cut file: EOFError, RuntimeError (zip), UnpicklingError
            if not isinstance(get_filesystem(path), LocalFileSystem):
                raise
            raise UnreadableCheckpointError(unreadable_message(Path(path), error)) from error


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries in ``folder`` left by saves that were killed; returns what was
    deleted. A temporary of another process that is still running is kept."""
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_is_running(pid):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def unreadable_message(path: Path, error: Exception) -> str:
    """What went wrong with ``path`` and which checkpoints of its folder to resume from instead."""
    size = path.stat().st_size if path.is_file() else None
    what = f"{size} bytes" if size is not None else "a folder"
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path and (p.is_dir() or p.stat().st_size > 0)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    head = (
        f"checkpoint {path} cannot be loaded ({what}; {type(error).__name__}: {error}); it was probably cut "
        "short by a crash while it was saved (or copied), or it is not a Lightning checkpoint."
    )
    if not others:
        return f"{head} No other checkpoint in {path.parent}: resume from another folder or start without --ckpt_path."
    listing = "; ".join(
        f"{p.name} ({datetime.fromtimestamp(p.stat().st_mtime):%Y-%m-%d %H:%M:%S})" for p in others
    )
    return f"{head} Other checkpoints in {path.parent}, newest first: {listing}. Resume with --ckpt_path {others[0]}"


def use_atomic_checkpoints(trainer: Trainer) -> Trainer:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a checkpoint
    plugin of its own (only Lightning's default :class:`TorchCheckpointIO` is replaced)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX; Windows cannot open a folder for syncing)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _process_is_running(pid: int) -> bool:
    if os.name != "posix":  # os.kill would terminate it there; keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
