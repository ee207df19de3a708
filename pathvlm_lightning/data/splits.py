"""Disjoint, image-grouped stage splits, written once and read by every stage.

The paper splits 5,385 PathMMU questions into 3,000 (SFT) / 1,000 (RL) / 1,385 (test) without
saying at what level; its authors later found 437 images shared between SFT and test, which lets
a model answer test questions about images it was trained on. Here all questions about one image
go to the same split. Images are matched by their resolved file path (``os.path.realpath``):
copies of one image under two names count as two images, so deduplicate files beforehand if that
matters (embedded images are already named by content hash by the loader).

A pipeline's stages (SFT, GRPO, evaluation) run as separate processes, possibly with different
configs; recomputing the split in each would silently drift if anything changed. So the split is
written once to ``<split_dir>/<name>.jsonl`` (canonical records, absolute image paths) with a
``manifest.json`` recording the source, seed, sizes and a fingerprint of the source ids. Later
runs re-use the files when the manifest matches and refuse to run when it does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.validation import DataValidationError, require_nonempty

log = logging.getLogger(__name__)

DEFAULT_SPLIT_SIZES: dict[str, int | None] = {"sft": 3000, "rl": 1000, "test": 1385}
MANIFEST_NAME = "manifest.json"
SPLIT_FORMAT_VERSION = 1


class SplitMismatchError(ValueError):
    """``split_dir`` holds a split made from other data or settings than the ones asked for."""


def normalise_sizes(sizes: Mapping[str, int | None]) -> dict[str, int | None]:
    """Check split names and sizes; ``-1`` becomes ``None`` ("the rest"). Order is kept: it is the fill order."""
    if not sizes:
        raise ValueError("split sizes are empty; give at least one split, e.g. {'sft': 3000, 'test': None}")
    result: dict[str, int | None] = {}
    for name, size in sizes.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"split name {name!r} must be letters, digits, '-' or '_'")
        if size is None or size == -1:
            result[name] = None
        elif isinstance(size, int) and size > 0:
            result[name] = size
        else:
            raise ValueError(f"split {name!r} has size {size!r}; use a positive count, or null / -1 for the rest")
    rest = [name for name, size in result.items() if size is None]
    if len(rest) > 1:
        raise ValueError(f"only one split may take the rest (null / -1), got {rest}")
    return result


def image_key(record: VQARecord) -> str:
    """What makes two records share an image: the resolved path of the image file."""
    return os.path.realpath(record.image)


def image_groups(records: list[VQARecord]) -> list[list[VQARecord]]:
    """Records grouped by :func:`image_key`, groups sorted by key (so the seed alone decides the split)."""
    groups: dict[str, list[VQARecord]] = defaultdict(list)
    for record in records:
        groups[image_key(record)].append(record)
    return [groups[key] for key in sorted(groups)]


def assign_splits(records: list[VQARecord], sizes: Mapping[str, int | None], seed: int) -> dict[str, list[VQARecord]]:
    """Deal seeded-shuffled image groups into the splits; every image lands in exactly one split.

    Each group goes to the first split (in ``sizes`` order) with room for all of it, else to the
    split that takes the rest, else it is left unused. A fixed size that cannot be met exactly
    while keeping images together raises, saying how many records are missing.
    """
    sizes = normalise_sizes(sizes)
    fixed = [(name, size) for name, size in sizes.items() if size is not None]
    rest = next((name for name, size in sizes.items() if size is None), None)
    needed = sum(size for _, size in fixed) + (1 if rest else 0)
    if len(records) < needed:
        raise ValueError(
            f"the data has {len(records)} records but the split sizes {sizes} need at least {needed}: "
            f"{needed - len(records)} too few"
        )
    groups = image_groups(records)
    random.Random(seed).shuffle(groups)
    splits: dict[str, list[VQARecord]] = {name: [] for name in sizes}
    for group in groups:
        target = next((name for name, size in fixed if len(splits[name]) + len(group) <= size), rest)
        if target is not None:
            splits[target].extend(group)
    for name, size in fixed:
        if len(splits[name]) < size:
            raise ValueError(
                f"split {name!r} got {len(splits[name])} of {size} records ({size - len(splits[name])} short) "
                f"while keeping the {len(groups)} images of {len(records)} records together; lower its size"
            )
    return splits  # the rest split is not empty: it holds total - sum(fixed) >= 1 records


def source_fingerprint(records: list[VQARecord]) -> str:
    """sha256 over the sorted record ids: changes when the usable source records change."""
    digest = hashlib.sha256()
    for record_id in sorted(record.id for record in records):
        digest.update(record_id.encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass
class SplitManifest:
    """What a split directory was made from; two runs share a split only when these agree."""

    source: str  # absolute path of the records file or dataset folder
    seed: int
    sizes: dict[str, int | None]  # in fill order
    fingerprint: str = ""
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    unused: int = 0
    grouping: str = "realpath of the image file"
    version: int = SPLIT_FORMAT_VERSION

    def differences(self, other: SplitManifest, check_fingerprint: bool = True) -> list[str]:
        """Human-readable settings that differ between ``self`` (on disk) and ``other`` (asked for)."""
        wanted = [("source", self.source, other.source), ("seed", self.seed, other.seed)]
        wanted.append(("sizes", list(self.sizes.items()), list(other.sizes.items())))
        wanted.append(("format version", self.version, other.version))
        if check_fingerprint:
            wanted.append(("source record ids (fingerprint)", self.fingerprint[:12], other.fingerprint[:12]))
        return [f"{name}: {have!r} on disk, {want!r} asked" for name, have, want in wanted if have != want]

    @classmethod
    def read(cls, split_dir: str | os.PathLike) -> SplitManifest | None:
        path = Path(split_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def write(self, split_dir: str | os.PathLike) -> None:
        _write_atomic(Path(split_dir) / MANIFEST_NAME, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def check_manifest(split_dir: str | os.PathLike, asked: SplitManifest, check_fingerprint: bool) -> SplitManifest | None:
    """The manifest in ``split_dir`` when it matches ``asked``; ``None`` when there is none; raises otherwise."""
    found = SplitManifest.read(split_dir)
    if found is None:
        return None
    differences = found.differences(asked, check_fingerprint)
    if differences:
        raise SplitMismatchError(
            f"split_dir {str(split_dir)!r} holds splits made differently ({'; '.join(differences)}). "
            f"Choose another split_dir, or delete {str(split_dir)!r} to split again."
        )
    return found


def prepare_splits(
    records: list[VQARecord], split_dir: str | os.PathLike, asked: SplitManifest
) -> SplitManifest:
    """Re-use the split files in ``split_dir`` when their manifest matches, else compute and write them.

    ``asked`` gives source, seed and sizes; its fingerprint is filled here from ``records``.
    The manifest is written last, so a crash midway leaves no manifest and the next run rewrites.
    """
    asked = dataclasses.replace(asked, sizes=normalise_sizes(asked.sizes), fingerprint=source_fingerprint(records))
    found = check_manifest(split_dir, asked, check_fingerprint=True)
    if found is not None:
        log.info("re-using splits in %s: %s", split_dir, found.counts)
        return found
    splits = assign_splits(records, asked.sizes, asked.seed)
    Path(split_dir).mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        lines = "".join(json.dumps(record_to_json(record)) + "\n" for record in split)
        _write_atomic(Path(split_dir) / f"{name}.jsonl", lines)
    manifest = dataclasses.replace(
        asked,
        counts={name: len(split) for name, split in splits.items()},
        unused=len(records) - sum(len(split) for split in splits.values()),
    )
    manifest.write(split_dir)
    log.info("wrote splits to %s: %s (%d records unused)", split_dir, manifest.counts, manifest.unused)
    return manifest


def read_split(split_dir: str | os.PathLike, name: str) -> list[VQARecord]:
    """The records of split ``name`` written by :func:`prepare_splits` (plain JSON lines: our own format)."""
    manifest = SplitManifest.read(split_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {str(split_dir)!r}: prepare the splits first (prepare_data)")
    if name not in manifest.counts:
        raise ValueError(f"split {name!r} is not in {str(split_dir)!r}; it has {sorted(manifest.counts)}")
    path = Path(split_dir) / f"{name}.jsonl"
    with path.open() as lines:
        records = [record_from_json(json.loads(line)) for line in lines if line.strip()]
    require_nonempty(records, name, str(path))
    if len(records) != manifest.counts[name]:
        raise DataValidationError(
            f"{path}: holds {len(records)} records but the manifest says {manifest.counts[name]}; "
            f"the split files were edited: delete {str(split_dir)!r} to split again",
            "split_changed",
        )
    return records


def record_to_json(record: VQARecord) -> dict[str, Any]:
    """A record as a canonical ``pathmmu`` row (``extra`` included)."""
    return dataclasses.asdict(record)


def record_from_json(row: Mapping[str, Any]) -> VQARecord:
    return VQARecord(**{**row, "options": dict(row["options"]), "extra": dict(row.get("extra") or {})})


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
