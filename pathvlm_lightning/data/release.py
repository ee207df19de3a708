"""PathMMU's question files as published: a JSON object of splits, or of subsets of splits.

The release's ``data.json`` is ``{"PubMed": {"val": [...], "test": [...], "test_tiny": [...]},
"EduContent": {...}, ...}`` with the images in ``images/`` next to it; the per-subset files
(``socialpath_mapping.json``) are ``{"val": [...], "test": [...], ...}``. A record holds ``No`` (an
integer that restarts at 0 in every split), ``img`` (a file name under ``images/``), ``question``,
``options`` (``["A) text", ...]``), ``answer`` (``"D) text"``, a few a bare letter) and
``explanation``, plus source fields that are ignored.

Each split is one :class:`RowSource` named ``<file> [<subset>/<split>]`` in messages. Ids are
``<file stem>:<split key>:<No>`` (``data:PubMed/test:12``): unique although ``No`` restarts, and
the same on every machine. A record's subset is its top-level key in ``data.json`` (``PubMed``),
or the file's name before ``_mapping`` (``socialpath``).

Every split is read by default, ``test_tiny`` included: it holds questions of its own, none of
them in ``test`` (SocialPath: val 155, test 1,620, test_tiny 235), and PathMMU's own evaluation
counts ``*_test`` plus ``*_test_tiny`` as the test set. ``release_splits`` picks what is read: a
subset (``PubMed``: all its splits), a split key (``PubMed/test_tiny``, or ``val`` in a per-subset
file). The splits left out by ``release_splits`` are logged at WARNING with their record counts,
and :func:`~pathvlm_lightning.data.loaders.load_records` logs the records kept per split at WARNING,
so a CLI run shows what was read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pathvlm_lightning.data.errors import DataValidationError
from pathvlm_lightning.data.files import RowSource, check_rows, columns_of, describe_keys, json_kind, read_json
from pathvlm_lightning.data.sources import source_files

log = logging.getLogger(__name__)

RELEASE_STYLE = "pathmmu_release"
RELEASE_FILE = "data.json"
RELEASE_IMAGE_FOLDER = "images"
#: The release's columns, as :class:`~pathvlm_lightning.data.loaders.FieldMap` fields.
RELEASE_FIELDS: dict[str, Any] = dict(
    id="No", image="img", question="question", options="options", answer="answer",
    explanation="explanation", subset=None, modality=None, extra=None,
)  # fmt: skip


def release_files(path: str | os.PathLike) -> list[Path]:
    """The files to read: a folder holding ``data.json`` means that file (``*_mapping.json`` files
    hold subsets it already has, with their download fields); otherwise as :func:`source_files`."""
    folder = Path(path)
    if folder.is_dir() and (folder / RELEASE_FILE).is_file():
        others = sorted(p.name for p in folder.glob("*.json") if p.name != RELEASE_FILE)
        if others:
            log.info("%s: reading %s only, not %s (subsets it already holds)", folder, RELEASE_FILE, others)
        return [folder / RELEASE_FILE]
    return source_files(path)


def release_sources(file: Path, wanted: Sequence[str] | None = None) -> list[RowSource]:
    """One :class:`RowSource` per split of ``file`` that ``wanted`` selects (``None``: every split),
    in file order; each split left out is logged at WARNING with its record count. Entries of
    ``wanted`` that match nothing in this file are not an error here: a glob may name several
    files (see :func:`unmatched`)."""
    if file.suffix.lower() != ".json" or file.is_dir():
        raise DataValidationError(
            f"{file}: record_style {RELEASE_STYLE!r} reads PathMMU's .json release files, not this file", "bad_file"
        )
    parts = _parts(file, read_json(file))
    sources = []
    for key, rows in parts.items():
        if not _selected(key, wanted):
            log.warning("%s: left out split %s (%d records): not in release_splits %s", file, key, len(rows),
                        list(wanted or ()))
            continue
        where = f"{file} [{key}]"
        rows = check_rows(where, rows)
        subset = key.split("/", 1)[0] if "/" in key else file.stem.removesuffix("_mapping")
        sources.append(RowSource(file, rows, columns_of(rows), part=key, id_prefix=f"{file.stem}:{key}", subset=subset))
    return sources


def unmatched(wanted: Sequence[str] | None, sources: Sequence[RowSource]) -> list[str]:
    """The entries of ``wanted`` that selected no split of any of ``sources``."""
    keys = [source.part or "" for source in sources]
    return [entry for entry in wanted or () if not any(_selected(key, [entry]) for key in keys)]


def available_parts(files: Sequence[Path]) -> list[str]:
    """Every split key of ``files``, for the message about an unmatched ``release_splits`` entry."""
    return [key for file in files for key in _parts(file, read_json(file))]


def _parts(file: Path, value: Any) -> dict[str, list]:
    """``{split key: rows}`` of a release file; any other shape raises, naming the file and the key."""
    if not isinstance(value, Mapping):
        raise DataValidationError(
            f"{file}: record_style {RELEASE_STYLE!r} reads PathMMU's release files, a JSON object of splits "
            f"({{\"val\": [...], ...}}) or of subsets of splits (data.json), but this file holds a JSON "
            f"{json_kind(value)}; use record_style 'pathmmu' for a list of records",
            "bad_file",
        )
    parts: dict[str, list] = {}
    for key, inner in value.items():
        if isinstance(inner, list):
            parts[key] = inner
        elif isinstance(inner, Mapping) and all(isinstance(rows, list) for rows in inner.values()):
            parts.update({f"{key}/{split}": rows for split, rows in inner.items()})
        else:
            raise DataValidationError(
                f"{file}: key {key!r} holds a JSON {json_kind(inner)}"
                + (f" with {describe_keys(inner)}" if isinstance(inner, Mapping) else "")
                + "; a release file maps each split to a list of records, or each subset to such splits",
                "bad_file",
            )
    if not parts:
        raise DataValidationError(f"{file}: the JSON object has no splits", "bad_file")
    return parts


def _selected(key: str, wanted: Sequence[str] | None) -> bool:
    """``key`` (``PubMed/test_tiny``) is read: no selection, or an entry naming it or its subset."""
    if wanted is None:
        return True
    return any(key == entry or key.startswith(f"{entry}/") for entry in wanted)
