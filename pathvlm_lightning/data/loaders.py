"""Reading question sets from disk into :class:`VQARecord` lists.

Pathology VQA data comes in several shapes: PathMMU-style rows with an options column, PathMMU's
own release files (an object of splits, read as published: :mod:`pathvlm_lightning.data.release`),
the VLM-R1/R1-V lineage that packs the options into the question text and the reasoning into the
solution, and OmniMedVQA with one column per option. A :class:`FieldMap` names the source column
of each record field, and a record style says how to read those columns, so a new dataset needs a
mapping, not a new loader. Each file is read and checked for encoding and shape first
(:mod:`pathvlm_lightning.data.files`); embedded image bytes (parquet, saved datasets) are written
once to ``image_dir`` (named by content hash) so that every record points at a file, splits can
group questions by image path, and workers can reopen them. A release split over many files
(OmniMedVQA's ``QA_information/Open-access/<dataset>.json``) is read from its folder or a glob
pattern, file by file in sorted order, so every message names the file it is about.

Image paths must lie under the image root (``image_root``, by default the data file's folder),
checked on their real path, unless ``allow_absolute_image_paths`` is set; ``image_path_map`` maps
the absolute paths of another machine into it (:mod:`pathvlm_lightning.data.image_paths`).
Every record goes through the checks of :mod:`pathvlm_lightning.data.validation`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from PIL import Image

from pathvlm_lightning.data.files import RowSource, read_source
from pathvlm_lightning.data.image_paths import ImagePaths, check_path_map
from pathvlm_lightning.data.options import (  # noqa: F401  (OPTION_LETTERS, parse_option_lines: imported from here)
    OPTION_LETTERS,
    parse_option_lines,
    parse_options,
    resolve_answer,
    split_vlm_r1_problem,
    split_vlm_r1_solution,
)
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.release import (
    RELEASE_FIELDS,
    RELEASE_IMAGE_FOLDER,
    RELEASE_STYLE,
    available_parts,
    release_files,
    release_sources,
    unmatched,
)
from pathvlm_lightning.data.sources import default_image_root, source_files
from pathvlm_lightning.data.sources import read_table  # noqa: F401  (re-exported: its home before sources.py)
from pathvlm_lightning.data.validation import (
    MIN_OPTIONS,
    DataValidationError,
    InvalidRecord,
    RecordChecks,
    RecordPolicy,
    ValidationReport,
    check_on_invalid,
    check_record,
)

log = logging.getLogger(__name__)

RecordStyle = Literal["pathmmu", "pathmmu_release", "vlm_r1", "omnimedvqa"]
RECORD_STYLES: tuple[str, ...] = ("pathmmu", RELEASE_STYLE, "vlm_r1", "omnimedvqa")
OMNIMEDVQA_OPTION_COLUMNS = ["option_A", "option_B", "option_C", "option_D"]


@dataclass
class FieldMap:
    """The source column of each record field; ``None`` means the source has no such column.

    ``options`` is one column (a dict letter -> text, a list of texts, or lines ``A) text``) or a
    list of columns, one per letter in order (OmniMedVQA's ``option_A`` .. ``option_D``; empty
    ones are left out; with record style ``omnimedvqa`` only the first two columns must exist, as
    a file whose questions all have two or three options has no ``option_D`` at all). Without an
    ``id`` column, ids are ``<file stem>-<row>``. Missing ``explanation``/``subset``/``modality``
    columns give empty strings; ``extra`` (a dict, e.g. the synthetic set's drawing spec) is
    carried into ``VQARecord.extra`` when present.
    """

    id: str | None = "id"
    image: str = "image"
    question: str = "question"
    options: str | list[str] | None = "options"
    answer: str = "answer"
    explanation: str | None = "explanation"
    subset: str | None = "subset"
    modality: str | None = "modality"
    extra: str | None = "extra"

    @classmethod
    def for_style(cls, style: str, overrides: Mapping[str, Any] | None = None) -> FieldMap:
        """The default mapping of ``style`` with ``overrides`` (field -> column) applied."""
        if style not in RECORD_STYLES:
            raise ValueError(f"record_style must be one of {RECORD_STYLES}, got {style!r}")
        base = cls(**_STYLE_DEFAULTS[style])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ValueError(f"field_map has unknown fields {unknown}; known fields are {sorted(known)}")
        return replace(base, **dict(overrides or {}))


#: Each style's columns where they differ from the PathMMU-style defaults of :class:`FieldMap`.
_STYLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pathmmu": {},
    RELEASE_STYLE: RELEASE_FIELDS,
    "vlm_r1": dict(question="problem", answer="solution", options=None, explanation=None),
    # OmniMedVQA: ``gt_answer`` is the option TEXT; ``question_type`` (e.g. "Disease Diagnosis")
    # plays the role of the subset, ``modality_type`` (e.g. "CT(Computed Tomography)") the modality.
    "omnimedvqa": dict(
        id="question_id",
        image="image_path",
        options=list(OMNIMEDVQA_OPTION_COLUMNS),
        answer="gt_answer",
        explanation=None,
        subset="question_type",
        modality="modality_type",
        extra=None,
    ),
}


class LoadResult(NamedTuple):
    records: list[VQARecord]
    report: ValidationReport


def load_records(
    path: str | os.PathLike,
    style: str = "pathmmu",
    field_map: FieldMap | Mapping[str, Any] | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_invalid: str = "error",
    checks: RecordChecks = RecordChecks(),
    allow_absolute_image_paths: bool = False,
    release_splits: Sequence[str] | None = None,
    image_path_map: Mapping[str, str] | None = None,
) -> LoadResult:
    """Read, convert and check every row of ``path`` (a file, a saved dataset, a folder of files or
    a glob pattern: see :func:`source_files`; for ``pathmmu_release``, a folder holding ``data.json``
    means that file); ids must be unique across all its files.

    Relative image paths are taken from ``image_root`` (default: :func:`default_image_root`; its
    ``images/`` folder for ``pathmmu_release``); a path whose real location (links followed) is
    outside it is an ``image_outside_root`` problem unless ``allow_absolute_image_paths``.
    ``image_path_map`` (prefix -> folder, relative to the image root or absolute) rewrites paths
    written on another machine first (:class:`~pathvlm_lightning.data.image_paths.ImagePaths`).
    Embedded images (bytes or decoded PIL images) are written to ``image_dir``, which is then
    required. ``checks`` says what else every record is checked for (image files and sizes,
    special tokens). ``release_splits`` selects the splits of a ``pathmmu_release`` file
    (default: every split, ``test_tiny`` included; see :mod:`pathvlm_lightning.data.release`);
    the records kept per split are logged at WARNING.

    A file that cannot be read as records, or a required column missing altogether (a mapping
    mistake), raises at once whatever ``on_invalid`` says. Messages name the file (and split).
    """
    if not isinstance(field_map, FieldMap):
        field_map = FieldMap.for_style(style, field_map)
    elif style not in RECORD_STYLES:
        raise ValueError(f"record_style must be one of {RECORD_STYLES}, got {style!r}")
    if release_splits is not None and style != RELEASE_STYLE:
        raise ValueError(
            f"release_splits {list(release_splits)} only apply to record_style {RELEASE_STYLE!r}, not {style!r}"
        )
    check_on_invalid(on_invalid)
    path_map = check_path_map(image_path_map)
    files = release_files(path) if style == RELEASE_STYLE else source_files(path)
    if image_root is not None:
        root = Path(image_root).resolve()
    else:
        root = default_image_root(path, style)
        root = root / RELEASE_IMAGE_FOLDER if style == RELEASE_STYLE else root
    image_paths = ImagePaths(root, path_map, allow_outside=allow_absolute_image_paths)
    report = ValidationReport(source=str(Path(path).resolve()))
    state = _LoadState(checks=checks)
    sources = _read_sources(files, style, field_map, release_splits)
    for source in sources:
        if len(sources) > 1 and len(source.rows) == 0:
            log.warning("%s holds no records", source.name)
            continue
        converter = _RowConverter(
            field_map=field_map,
            style=style,
            source=source,
            image_paths=image_paths,
            image_dir=Path(image_dir) if image_dir is not None else None,
        )
        file_report = state.load(converter, RecordPolicy(source.name, on_invalid))
        report.seen += file_report.seen
        report.skipped.update(file_report.skipped)
        report.messages.extend(file_report.messages)
        report.kept_by_part[source.label] = file_report.kept
    report.kept = len(state.records)
    if style == RELEASE_STYLE:  # at WARNING so that a CLI run shows what was read from the release
        by_split = ", ".join(f"{part} {n}" for part, n in report.kept_by_part.items())
        log.warning("%s: read %d PathMMU release records, by split: %s", report.source, report.kept, by_split)
    if report.num_skipped:
        log.warning("%s", report.summary())
    if not state.records:
        raise DataValidationError(f"no usable records: {report.summary()}", "empty_split")
    return LoadResult(state.records, report)


def _read_sources(
    files: list[Path], style: str, field_map: FieldMap, release_splits: Sequence[str] | None
) -> list[RowSource]:
    if style != RELEASE_STYLE:
        return [read_source(file, field_map.image) for file in files]
    sources = [source for file in files for source in release_sources(file, release_splits)]
    missing = unmatched(release_splits, sources)
    if missing:
        raise DataValidationError(
            f"{', '.join(map(str, files))}: release_splits {missing} match no split; the splits are "
            f"{available_parts(files)}",
            "bad_file",
        )
    return sources


@dataclass
class _LoadState:
    """What persists across the files of one source: the records so far, where each id was first
    seen (ids are unique across files), and the images already checked (a shared image is decoded once)."""

    checks: RecordChecks
    records: list[VQARecord] = field(default_factory=list)
    first_seen: dict[str, tuple[str, int]] = field(default_factory=dict)
    readable_images: set[str] = field(default_factory=set)

    def load(self, converter: _RowConverter, policy: RecordPolicy) -> ValidationReport:
        source = converter.source
        _check_columns(source.columns, converter.field_map, converter.style, source.name)
        for row_index, row in enumerate(source.rows):
            policy.report.seen += 1
            record_id = converter.record_id(row, row_index)
            try:
                record = converter.convert(row, record_id)
                check_record(record, self.checks, image_checked=record.image in self.readable_images)
                self.readable_images.add(record.image)
                self._check_unique(record.id, source.name, row_index)
            except InvalidRecord as problem:
                policy.handle(problem, record_id, row_index)
                continue
            self.records.append(record)
        policy.report.kept = policy.report.seen - policy.report.num_skipped
        return policy.report

    def _check_unique(self, record_id: str, source: str, row: int) -> None:
        if record_id in self.first_seen:
            first_source, first_row = self.first_seen[record_id]
            where = f"row {first_row}" if first_source == source else f"row {first_row} of {first_source}"
            raise InvalidRecord("duplicate_id", f"duplicate id {record_id!r} (first seen at {where})")
        self.first_seen[record_id] = (source, row)


def _check_columns(columns: list[str], field_map: FieldMap, style: str, source: str) -> None:
    required = [field_map.image, field_map.question, field_map.answer]
    if style != "vlm_r1":
        if field_map.options is None:
            raise ValueError(f"record_style {style!r} needs an options column in field_map")
        if isinstance(field_map.options, str):
            required.append(field_map.options)
        elif style == "omnimedvqa":  # later option columns may be absent from a whole file
            required += list(field_map.options[:MIN_OPTIONS])
        else:
            required += list(field_map.options)
    missing = [column for column in required if column not in columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {missing} needed by record_style {style!r}; "
            f"the file has {columns} (set field_map to map them)",
            "missing_field",
        )


@dataclass
class _RowConverter:
    """Turns one row of ``source`` into a :class:`VQARecord` (raising :class:`InvalidRecord` on a bad row)."""

    field_map: FieldMap
    style: str
    source: RowSource
    image_paths: ImagePaths
    image_dir: Path | None
    _columns: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self._columns = set(self.source.columns)

    def record_id(self, row: Mapping[str, Any], row_index: int) -> str | None:
        """The row's id (after the source's ``id_prefix``), ``<file stem>-<row>`` without an id column,
        ``None`` when the id cell is empty."""
        column = self.field_map.id
        if column is None or column not in self._columns:
            return f"{self.source.id_prefix or self.source.file.stem}-{row_index}"
        value = row.get(column)
        if value is None or str(value).strip() == "":
            return None
        return f"{self.source.id_prefix}:{str(value).strip()}" if self.source.id_prefix else str(value).strip()

    def convert(self, row: Mapping[str, Any], record_id: str | None) -> VQARecord:
        fm = self.field_map
        if record_id is None:
            raise InvalidRecord("missing_field", f"has no id (column {fm.id!r})")
        question = self._text(row, fm.question, required=True)
        if self.style == "vlm_r1":
            question, options = split_vlm_r1_problem(question)
            explanation, answer = split_vlm_r1_solution(self._text(row, fm.answer, required=True))
        else:
            options = parse_options(self._options_value(row))
            explanation, answer = self._text(row, fm.explanation), row.get(fm.answer)
        if not question:
            raise InvalidRecord("missing_field", f"has an empty question (column {fm.question!r})")
        return VQARecord(
            id=record_id,
            image=self._image_path(row.get(fm.image)),
            question=question,
            options=options,
            answer=resolve_answer(answer, options),
            explanation=explanation,
            subset=self._text(row, fm.subset) or self.source.subset,
            modality=self._text(row, fm.modality),
            extra=self._extra(row),
        )

    def _text(self, row: Mapping[str, Any], column: str | None, required: bool = False) -> str:
        value = row.get(column) if column is not None and column in self._columns else None
        if value is None or str(value).strip() == "":
            if required:
                raise InvalidRecord("missing_field", f"has no value in column {column!r}")
            return ""
        return str(value).strip()

    def _extra(self, row: Mapping[str, Any]) -> dict[str, Any]:
        column = self.field_map.extra
        value = row.get(column) if column is not None and column in self._columns else None
        if value is None:
            return {}
        return dict(value) if isinstance(value, Mapping) else {column: value}

    def _options_value(self, row: Mapping[str, Any]) -> Any:
        column = self.field_map.options
        if isinstance(column, str):
            return row.get(column)
        return [row.get(c) for c in column if c in self._columns]  # type: ignore[union-attr]

    def _image_path(self, value: Any) -> str:
        """A file path for the image cell: a path (relative to ``image_root``), bytes, or a PIL image."""
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            value = {"bytes": buffer.getvalue(), "path": None}
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return self._write_embedded(value["bytes"])
            value = value.get("path")
        if value is None or str(value).strip() == "":
            raise InvalidRecord("missing_field", f"has no image (column {self.field_map.image!r})")
        return self.image_paths.resolve(str(value).strip())

    def _write_embedded(self, data: bytes) -> str:
        if self.image_dir is None:
            raise ValueError("the data embeds image bytes: pass image_dir, the folder to write them to")
        try:
            with Image.open(io.BytesIO(data)) as image:
                suffix = (image.format or "img").lower()
        except Exception:  # an unreadable image is still written; check_image then reports it as corrupt
            suffix = "img"
        target = self.image_dir.resolve() / f"{hashlib.sha256(data).hexdigest()[:24]}.{suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            partial.write_bytes(data)
            os.replace(partial, target)
        return str(target)

