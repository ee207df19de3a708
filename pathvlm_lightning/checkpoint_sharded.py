"""Sharded checkpoint folders that a crash cannot leave half-written, and how to tell a complete one.

Under FSDP2 (``ModelParallelStrategy`` with ``save_distributed_checkpoint=True``, its default) and
FSDP with ``state_dict_type="sharded"``, Lightning saves a checkpoint as a folder: one shard file per
process (``torch.distributed.checkpoint``), its ``.metadata``, and rank 0's ``meta.pt`` (loops,
callbacks, schedulers). Lightning writes into the final folder in place, so a kill while ``last.ckpt``
is saved again leaves the previous ``meta.pt`` beside half-replaced shards: a folder that Lightning
loads, but that is neither the old checkpoint nor the new one.

Here every rank writes into a new hidden folder beside the target, ``.<name>.tmp-<pid>-<hex>``. After
a barrier, rank 0 flushes its files to disk and writes :data:`MARKER` last (the global step and the
size of every file). Then it publishes the folder: an existing target is renamed aside
(``.<name>.old-<pid>-<hex>``), the new folder is renamed into place, the parent folder is flushed,
and the old one is removed (its marker first). A folder is complete exactly when it holds a marker
whose files are all there at their recorded sizes. At every moment of a save the newest complete
state is findable: the target, or (killed between the two renames) the hidden new folder. The next
save into the same parent restores such a folder into place and removes everything else a killed
save left (:func:`tidy_folder`). Removing a folder checkpoint (top-k rotation) takes its marker away
first, so a removal cut short leaves nothing that looks complete.

The CLI installs this with :func:`use_atomic_folders` (beside ``checkpoint_io``'s atomic files). Remote paths (``s3://``...) are left to Lightning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from typing_extensions import override

from pathvlm_lightning.checkpoint_io import _fsync_folder, _process_is_running

log = logging.getLogger(__name__)

#: written last into a sharded checkpoint folder; its presence (with every file it lists) = complete
MARKER = "checkpoint_complete.json"
#: ``.<name>.tmp-<pid>-<hex>`` (being written, or left by a killed save) and ``.<name>.old-...`` (set aside)
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


class AtomicFolderSaves(ParallelStrategy):
    """Strategy mixin: folder checkpoints are written to a hidden temporary, marked complete and renamed
    into place once every rank has written its shards (see the module docstring). It derives from
    ``ParallelStrategy`` and adds no state, so that its subclasses keep their base's instance layout
    and :func:`use_atomic_folders` can switch a configured strategy to them."""

    def _writes_folders(self) -> bool:
        raise NotImplementedError

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not self._writes_folders() or not _is_local(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))
        temporary = None
        if self.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            tidy_folder(target.parent)
            temporary = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        temporary = Path(self.broadcast(temporary))
        info = {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"), "world_size": self.world_size}
        super().save_checkpoint(checkpoint, temporary)
        self.barrier("sharded_checkpoint_written")  # every rank's shards are on disk
        if self.is_global_zero:
            mark_complete(temporary, info)
            publish_folder(temporary, target)
        self.barrier("sharded_checkpoint_published")

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath) if _is_local(filepath) else None
        if path is not None and path.is_dir() and not path.is_symlink():
            if self.is_global_zero:
                remove_folder(path)
            return
        super().remove_checkpoint(filepath)


class AtomicModelParallelStrategy(AtomicFolderSaves, ModelParallelStrategy):
    """:class:`ModelParallelStrategy` (FSDP2) whose sharded checkpoint folders appear only when complete."""

    def _writes_folders(self) -> bool:
        return self._save_distributed_checkpoint


class AtomicFSDPStrategy(AtomicFolderSaves, FSDPStrategy):
    """:class:`FSDPStrategy` whose ``state_dict_type="sharded"`` folders appear only when complete."""

    def _writes_folders(self) -> bool:
        return self._state_dict_type == "sharded"


_ATOMIC = {ModelParallelStrategy: AtomicModelParallelStrategy, FSDPStrategy: AtomicFSDPStrategy}


def use_atomic_folders(trainer: Trainer) -> Trainer:
    """Make ``trainer``'s strategy write folder checkpoints atomically when it is Lightning's own
    ``ModelParallelStrategy`` or ``FSDPStrategy`` (a subclass of either is left alone). The strategy
    object is kept, with all its settings; only its class becomes the subclass that adds the two
    checkpoint methods (no state of its own)."""
    atomic = _ATOMIC.get(type(trainer.strategy))
    if atomic is not None:
        trainer.strategy.__class__ = atomic
    return trainer


def mark_complete(folder: Path, info: dict[str, Any]) -> None:
    """Flush every file of ``folder`` to disk, then write :data:`MARKER` (``info`` plus each file's size)
    through a temporary and a rename, and flush the folder."""
    files = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            _fsync_file(entry)
            files[entry.name] = entry.stat().st_size
    temporary = folder / f".{MARKER}.partial"
    with open(temporary, "w") as file:
        json.dump({**info, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / MARKER)
    _fsync_folder(folder)


def completed_step(folder: Path) -> int | None:
    """The global step of the complete checkpoint folder ``folder``; ``None`` when it has no marker,
    or a file the marker lists is missing or has another size (partial, or partly removed)."""
    try:
        info = json.loads((folder / MARKER).read_text())
        files = info["files"]
        if any((folder / name).stat().st_size != size for name, size in files.items()):
            return None
        return int(info["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_folder(temporary: Path, target: Path) -> None:
    """Rename the complete folder ``temporary`` to ``target``, replacing what is there: the old one is
    renamed aside first, and removed only once the new one is in place."""
    aside = None
    if target.exists() or target.is_symlink():
        aside = _hidden_name(target, "old")
        os.replace(target, aside)
    os.replace(temporary, target)
    _fsync_folder(target.parent)
    if aside is not None:
        remove_folder(aside)


def remove_folder(path: Path) -> None:
    """Remove a checkpoint (a folder, or a file or link that took its name) so that no moment of the
    removal leaves something that looks complete: the marker goes first, then the folder is renamed
    to a hidden name (which :func:`tidy_folder` cleans if this is cut short) and deleted."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    (path / MARKER).unlink(missing_ok=True)
    _fsync_folder(path)
    if _HIDDEN.match(path.name) is None:
        hidden = _hidden_name(path, "old")
        os.replace(path, hidden)
        _fsync_folder(path.parent)
        path = hidden
    shutil.rmtree(path, ignore_errors=True)


def tidy_folder(parent: Path) -> tuple[list[Path], list[Path]]:
    """Clean what killed saves left in ``parent``; returns ``(restored, removed)``.

    For a checkpoint name whose folder is missing (a save killed between its two renames), the newest
    complete hidden folder of that name is renamed into place. Every other hidden folder of a save
    that is not running any more (its writer's process is gone, or it is this process) is removed.
    """
    left: dict[str, list[Path]] = {}
    for entry in parent.iterdir():
        match = _HIDDEN.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_is_running(pid):
            continue  # another save in progress
        left.setdefault(match["name"], []).append(entry)
    restored, removed = [], []
    for name, entries in left.items():
        target = parent / name
        complete = [(step, e) for e in entries if e.is_dir() and (step := completed_step(e)) is not None]
        if complete and not (target.exists() or target.is_symlink()):
            _, newest = max(complete, key=lambda c: (c[0], c[1].stat().st_mtime))
            os.replace(newest, target)
            _fsync_folder(parent)
            log.warning("restored %s from %s, left complete by a save killed before it was in place", target, newest.name)
            restored.append(target)
            entries.remove(newest)
        for entry in entries:
            remove_folder(entry)
            removed.append(entry)
    if removed:
        log.info("removed what killed saves left in %s: %s", parent, ", ".join(p.name for p in removed))
    return restored, removed


def is_hidden_checkpoint(name: str) -> bool:
    """Whether ``name`` is a folder name this module gives a save being written or set aside."""
    return _HIDDEN.match(name) is not None


def _hidden_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _is_local(path: Any) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
