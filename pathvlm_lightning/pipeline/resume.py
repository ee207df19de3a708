"""Which checkpoint an interrupted fit resumes from: the newest complete one of its checkpoint folder.

Candidates are the folder's ``*.ckpt`` entries, single files (DDP, one device, FSDP with full state
dicts) and sharded folders (FSDP2), and the hidden complete folder that a sharded save killed between
its two renames leaves (:mod:`pathvlm_lightning.checkpoint_sharded`). Newest means the highest global
step the checkpoint itself records (a file's ``global_step``, read without loading its tensors; a
folder's completion marker), not the modification time nor the step in a file name, which a renamed
or copied file would not keep. A tie goes to a visible name, then to the later modification time.

Never picked: a file that does not load (cut short by a crash, e.g. written by an older version or a
plugin without atomic saves), a folder without a complete marker (written in part, partly removed,
or written by a version without markers), anything else in the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pathvlm_lightning.checkpoint_sharded import MARKER, completed_step, is_hidden_checkpoint


@dataclass(frozen=True)
class ResumeChoice:
    """The newest complete checkpoint (``None`` when there is none) and what was passed over, and why."""

    path: Path | None = None
    step: int | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def newest_complete_checkpoint(folder: str | Path) -> ResumeChoice:
    """The checkpoint of ``folder`` to resume from (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        return ResumeChoice()
    found: list[tuple[int, bool, float, Path]] = []
    skipped: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir()):
        hidden = is_hidden_checkpoint(entry.name)
        if not (hidden or (entry.suffix == ".ckpt" and not entry.name.startswith("."))):
            continue
        if entry.is_dir():
            step = completed_step(entry)
            if step is None and not hidden:
                skipped.append((entry, f"a folder without a complete {MARKER} (partial, or from an older version)"))
        elif hidden:
            step = None
        else:
            step = _file_step(entry)
            if step is None:
                skipped.append((entry, "a file that does not load (cut short?)"))
        if step is not None:
            found.append((step, not hidden, entry.stat().st_mtime, entry))
    if not found:
        return ResumeChoice(skipped=skipped)
    step, _, _, path = max(found)
    return ResumeChoice(path, step, skipped)


def _file_step(path: Path) -> int | None:
    """The ``global_step`` of a Lightning checkpoint file; ``None`` when it does not load. ``mmap``
    reads the pickled part only, so a checkpoint of many GB costs little. Not ``weights_only``: the
    file is the stage's own, which the resumed fit loads the same way."""
    import torch  # here: the runner itself needs torch only when a stage left a checkpoint file

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(checkpoint["global_step"])
    except Exception:  # a cut zip (RuntimeError), EOFError, UnpicklingError, a dict without the key
        return None
