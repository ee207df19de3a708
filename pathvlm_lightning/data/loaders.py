"""Reading question sets from disk into :class:`VQARecord` lists.

Pathology VQA data comes in several shapes: PathMMU-style rows with an options column, the
VLM-R1/R1-V lineage that packs the options into the question text and the reasoning into the
solution, and OmniMedVQA with one column per option. A :class:`FieldMap` names the source column
of each record field, and a record style says how to read those columns, so a new dataset needs a
mapping, not a new loader. Files are read with the ``datasets`` library (JSON, JSON lines,
parquet, or a folder written by ``save_to_disk``), which also decodes embedded image bytes; such
images are written once to ``image_dir`` (named by content hash) so that every record points at a
file, splits can group questions by image path, and workers can reopen them. A release split over
many files (OmniMedVQA's ``QA_information/Open-access/<dataset>.json``) is read from its folder or
a glob pattern, file by file in sorted order, so every message names the file it is about.

Every record goes through the checks of :mod:`pathvlm_lightning.data.validation`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
from PIL import Image

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.sources import default_image_root, read_file, source_files
from pathvlm_lightning.data.sources import read_table  # noqa: F401  (re-exported: its home before sources.py)
from pathvlm_lightning.data.validation import (
    MIN_OPTIONS,
    DataValidationError,
    InvalidRecord,
    RecordPolicy,
    ValidationReport,
    check_on_invalid,
    check_record,
)

log = logging.getLogger(__name__)

RecordStyle = Literal["pathmmu", "vlm_r1", "omnimedvqa"]
RECORD_STYLES: tuple[str, ...] = ("pathmmu", "vlm_r1", "omnimedvqa")
OPTION_LETTERS = string.ascii_uppercase
OMNIMEDVQA_OPTION_COLUMNS = ["option_A", "option_B", "option_C", "option_D"]

# "A) text", "(A) text", "A. text", "A: text"
_LABELLED = re.compile(r"^\s*\(?([A-Za-z])[\)\.:]\s*(.*?)\s*$", re.DOTALL)
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*$")
_OPTIONS_HEADER = re.compile(r"^\s*options\s*:\s*(.*)$", re.IGNORECASE)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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


def parse_options(value: Any) -> dict[str, str]:
    """Options in any accepted shape -> ``{"A": text, ...}`` in letter order.

    >>> parse_options(["red", "blue"])
    {'A': 'red', 'B': 'blue'}
    >>> parse_options("A) red\\nB) blue")
    {'A': 'red', 'B': 'blue'}
    """
    if value is None:
        raise InvalidRecord("missing_field", "has no options")
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidRecord("bad_options", f"options {value!r} look like JSON but do not parse: {err}") from err
    if isinstance(value, Mapping):
        options = {}
        for key, text in value.items():
            match = _BARE_LETTER.match(str(key))
            if match is None:
                raise InvalidRecord("bad_options", f"option key {key!r} is not a letter (options {dict(value)!r})")
            if text is not None and str(text).strip():
                options[match.group(1).upper()] = str(text).strip()
        return dict(sorted(options.items()))
    if isinstance(value, str):
        return _parse_option_lines([line for line in value.splitlines() if line.strip()], value)
    if isinstance(value, (list, tuple)):
        texts = [str(t).strip() for t in value if t is not None and str(t).strip()]
        labelled = [_LABELLED.match(t) for t in texts]
        if texts and all(m and m.group(1).upper() == OPTION_LETTERS[i] for i, m in enumerate(labelled)):
            return {m.group(1).upper(): m.group(2) for m in labelled}  # type: ignore[union-attr]
        if len(texts) > len(OPTION_LETTERS):
            raise InvalidRecord("bad_options", f"has {len(texts)} options; at most {len(OPTION_LETTERS)} supported")
        return dict(zip(OPTION_LETTERS, texts))
    raise InvalidRecord("bad_options", f"options {value!r} are neither a dict, a list nor text")


def parse_option_lines(lines: list[str], original: str | None = None) -> dict[str, str]:
    """Lines ``A) text`` (or ``(A) text``, ``A. text``, ``A: text``) -> ``{"A": text, ...}``; a line
    of another form or a letter given twice raises :class:`InvalidRecord` (``bad_options``).

    >>> parse_option_lines(["A) red", "(b) blue"])
    {'A': 'red', 'B': 'blue'}
    """
    return _parse_option_lines(lines, "\n".join(lines) if original is None else original)


def _parse_option_lines(lines: list[str], original: str) -> dict[str, str]:
    options = {}
    for line in lines:
        match = _LABELLED.match(line)
        if match is None:
            raise InvalidRecord("bad_options", f"option line {line!r} is not of the form 'A) text' (in {original!r})")
        letter = match.group(1).upper()
        if letter in options:
            raise InvalidRecord("bad_options", f"option {letter} appears twice in {original!r}")
        options[letter] = match.group(2)
    return dict(sorted(options.items()))


def resolve_answer(value: Any, options: Mapping[str, str]) -> str:
    """The answer as a letter of ``options``: from ``"B"``, ``"B) text"`` or the option text itself.

    >>> resolve_answer("B) blue", {"A": "red", "B": "blue"})
    'B'
    >>> resolve_answer("red", {"A": "red", "B": "blue"})
    'A'
    """
    if value is None or not str(value).strip():
        raise InvalidRecord("missing_field", "has no answer")
    text = str(value).strip()
    letters = sorted(options)
    bare = _BARE_LETTER.match(text)
    if bare and not _matching_texts(text, options):
        letter = bare.group(1).upper()
        if letter not in options:
            raise InvalidRecord("answer_not_in_options", f"answer {text!r} is not one of the options {letters}")
        return letter
    labelled = _LABELLED.match(text)
    if labelled and labelled.group(1).upper() in options and not _matching_texts(text, options):
        letter, answer_text = labelled.group(1).upper(), labelled.group(2)
        if _normalise(answer_text) != _normalise(options[letter]):
            raise InvalidRecord(
                "answer_not_in_options",
                f"answer {text!r} names option {letter} but option {letter} is {options[letter]!r}",
            )
        return letter
    matches = _matching_texts(text, options)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidRecord("answer_not_in_options", f"answer {text!r} matches several options {matches}")
    raise InvalidRecord("answer_not_in_options", f"answer {text!r} is not one of the options {dict(options)!r}")


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _matching_texts(text: str, options: Mapping[str, str]) -> list[str]:
    return [letter for letter, option in options.items() if _normalise(option) == _normalise(text)]


def split_vlm_r1_problem(problem: str) -> tuple[str, dict[str, str]]:
    """``"question\\nOptions:\\nA) x\\nB) y"`` -> ``("question", {"A": "x", "B": "y"})``."""
    lines = problem.splitlines()
    for index, line in enumerate(lines):
        header = _OPTIONS_HEADER.match(line)
        if header:
            option_lines = [header.group(1)] + lines[index + 1 :]
            question = "\n".join(lines[:index]).strip()
            return question, _parse_option_lines([ln for ln in option_lines if ln.strip()], problem)
    raise InvalidRecord("bad_options", f"problem text has no 'Options:' line: {problem!r}")


def split_vlm_r1_solution(solution: str) -> tuple[str, str]:
    """``"<think>why</think><answer>B) x</answer>"`` -> ``("why", "B) x")``; untagged text is the answer."""
    answer = _ANSWER.search(solution)
    think = _THINK.search(solution)
    explanation = think.group(1).strip() if think else ""
    return explanation, (answer.group(1) if answer else solution).strip()


def load_records(
    path: str | os.PathLike,
    style: str = "pathmmu",
    field_map: FieldMap | Mapping[str, Any] | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_invalid: str = "error",
    check_images: bool = True,
) -> LoadResult:
    """Read, convert and check every row of ``path`` (a file, a saved dataset, a folder of files or
    a glob pattern: see :func:`source_files`); ids must be unique across all its files.

    Relative image paths are taken from ``image_root`` (default: :func:`default_image_root`).
    Embedded images (bytes or decoded PIL images) are written to ``image_dir``, which is then
    required. A required column that is missing altogether is a mapping mistake and raises at
    once, whatever ``on_invalid`` says; so does an ``omnimedvqa`` .json file that is not a list.
    Messages about a record name the file it came from.
    """
    if not isinstance(field_map, FieldMap):
        field_map = FieldMap.for_style(style, field_map)
    elif style not in RECORD_STYLES:
        raise ValueError(f"record_style must be one of {RECORD_STYLES}, got {style!r}")
    check_on_invalid(on_invalid)
    files = source_files(path)
    root = Path(image_root).resolve() if image_root is not None else default_image_root(path, style)
    report = ValidationReport(source=str(Path(path).resolve()))
    state = _LoadState(check_images=check_images)
    for file in files:
        table = read_file(file, require_list=style == "omnimedvqa")
        if len(files) > 1 and len(table) == 0:
            log.warning("%s holds no records", file)
            continue
        converter = _RowConverter(
            field_map=field_map,
            style=style,
            columns=set(table.column_names),
            image_root=root,
            image_dir=Path(image_dir) if image_dir is not None else None,
            id_prefix=file.stem,
        )
        file_report = state.load(table, converter, RecordPolicy(str(file.resolve()), on_invalid))
        report.seen += file_report.seen
        report.skipped.update(file_report.skipped)
        report.messages.extend(file_report.messages)
    report.kept = len(state.records)
    if report.num_skipped:
        log.warning("%s", report.summary())
    if not state.records:
        raise DataValidationError(f"no usable records: {report.summary()}", "empty_split")
    return LoadResult(state.records, report)


@dataclass
class _LoadState:
    """What persists across the files of one source: the records so far, where each id was first
    seen (ids are unique across files), and the images already checked (a shared image is decoded once)."""

    check_images: bool
    records: list[VQARecord] = field(default_factory=list)
    first_seen: dict[str, tuple[str, int]] = field(default_factory=dict)
    readable_images: set[str] = field(default_factory=set)

    def load(self, table: datasets.Dataset, converter: _RowConverter, policy: RecordPolicy) -> ValidationReport:
        source = policy.report.source
        _check_columns(table, converter.field_map, converter.style, source)
        image_column = converter.field_map.image
        if isinstance(table.features.get(image_column), datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))
        for row_index, row in enumerate(table):
            policy.report.seen += 1
            record_id = converter.record_id(row, row_index)
            try:
                record = converter.convert(row, record_id)
                check_record(record, self.check_images and record.image not in self.readable_images)
                self.readable_images.add(record.image)
                self._check_unique(record.id, source, row_index)
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


def _check_columns(table: datasets.Dataset, field_map: FieldMap, style: str, source: str) -> None:
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
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {missing} needed by record_style {style!r}; "
            f"the file has {table.column_names} (set field_map to map them)",
            "missing_field",
        )


@dataclass
class _RowConverter:
    """Turns one source row into a :class:`VQARecord` (raising :class:`InvalidRecord` on a bad row)."""

    field_map: FieldMap
    style: str
    columns: set[str]
    image_root: Path
    image_dir: Path | None
    id_prefix: str

    def record_id(self, row: Mapping[str, Any], row_index: int) -> str | None:
        column = self.field_map.id
        if column is None or column not in self.columns:
            return f"{self.id_prefix}-{row_index}"
        value = row[column]
        return None if value is None or str(value).strip() == "" else str(value).strip()

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
            explanation, answer = self._text(row, fm.explanation), row[fm.answer]
        if not question:
            raise InvalidRecord("missing_field", f"has an empty question (column {fm.question!r})")
        return VQARecord(
            id=record_id,
            image=self._image_path(row[fm.image]),
            question=question,
            options=options,
            answer=resolve_answer(answer, options),
            explanation=explanation,
            subset=self._text(row, fm.subset),
            modality=self._text(row, fm.modality),
            extra=self._extra(row),
        )

    def _text(self, row: Mapping[str, Any], column: str | None, required: bool = False) -> str:
        value = row.get(column) if column is not None and column in self.columns else None
        if value is None or str(value).strip() == "":
            if required:
                raise InvalidRecord("missing_field", f"has no value in column {column!r}")
            return ""
        return str(value).strip()

    def _extra(self, row: Mapping[str, Any]) -> dict[str, Any]:
        column = self.field_map.extra
        value = row.get(column) if column is not None and column in self.columns else None
        if value is None:
            return {}
        return dict(value) if isinstance(value, Mapping) else {column: value}

    def _options_value(self, row: Mapping[str, Any]) -> Any:
        column = self.field_map.options
        if isinstance(column, str):
            return row[column]
        return [row[c] for c in column if c in self.columns]  # type: ignore[union-attr]

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
        path = Path(str(value).strip())
        return os.path.normpath(path if path.is_absolute() else self.image_root / path)

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
