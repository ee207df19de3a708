"""Reading one data file into rows, with the file-level checks done before any row is looked at.

JSON and JSON lines are parsed here, not by ``datasets``: a file that is not UTF-8, is empty, is
not valid JSON or is an object wrapping its records must stop with a message naming the file and
what to do, where ``datasets`` ends in a bare ``UnicodeDecodeError``, an empty ``StopIteration``
or a ``DatasetGenerationError``; and pyarrow's type unification turns one odd value anywhere in a
file (an ``id`` that is a number in one row and a string in the next) into a failure of the whole
file. Parquet files and ``save_to_disk`` folders, typed by construction, are read by ``datasets``,
which also decodes embedded images.

Accepted JSON shapes: a list of objects (a .json file), one object per line (.jsonl, or a .json
file whose first line is a whole object). A JSON object that wraps the records
(``{"questions": [...]}``, ``{"data": [...]}``) is refused, naming its keys: which key holds the
records, and whether several keys are splits, is a guess this module does not make. PathMMU's
release files, objects of splits, are read by record style ``pathmmu_release``
(:mod:`pathvlm_lightning.data.release`).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from pathvlm_lightning.data.errors import DataValidationError

JSON_SUFFIXES = (".json", ".jsonl")


@dataclass
class RowSource:
    """The rows of one file, or of one split of a release file.

    ``part`` is a release file's split key (``PubMed/test``); ``id_prefix``, when set, is put
    before every row's id (``data:PubMed/test`` -> ``data:PubMed/test:12``); ``subset`` is the
    records' subset when the rows do not name one.
    """

    file: Path
    rows: Sequence[Mapping[str, Any]]  # a list of dicts, or a datasets.Dataset
    columns: list[str]
    part: str | None = None
    id_prefix: str | None = None
    subset: str = ""

    @property
    def name(self) -> str:
        """How messages name the source: the file's path, and the split in brackets."""
        path = str(self.file.resolve())
        return f"{path} [{self.part}]" if self.part else path

    @property
    def label(self) -> str:
        """A short name for counts: ``<file stem>`` or ``<file stem>:<part>``."""
        return f"{self.file.stem}:{self.part}" if self.part else self.file.stem


def json_kind(value: Any) -> str:
    """``object``, ``list``, ``string``, ... : JSON's name for the type of a parsed value."""
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else "null"


def read_text(file: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark is allowed); anything else, or nothing but
    whitespace, raises :class:`DataValidationError` naming the file."""
    data = file.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataValidationError(f"{file}: is UTF-16 text; save it as UTF-8", "bad_file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataValidationError(
            f"{file}: is not UTF-8 text (byte {data[err.start]:#04x} on line {line}, offset {err.start}); "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
            "bad_file",
        ) from err
    if not text.strip():
        raise DataValidationError(f"{file}: is empty", "bad_file")
    return text


def read_json(file: Path) -> Any:
    """The JSON value of a .json file, or the list of values of a JSON lines file (a .jsonl file,
    or a .json file whose first line is a whole JSON object)."""
    text = read_text(file)
    if file.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data" or not _first_line_is_object(text):
                raise DataValidationError(
                    f"{file}: is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", "bad_file"
                ) from err
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataValidationError(
                    f"{file}: line {number} is not valid JSON: {err.msg} at column {err.colno}", "bad_file"
                ) from err
    return values


def _first_line_is_object(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def check_rows(where: str, value: Any) -> list[dict[str, Any]]:
    """``value`` (the parsed content of ``where``) as a list of record objects, or an error naming
    ``where`` and what the content is instead."""
    if isinstance(value, Mapping):
        raise DataValidationError(
            f"{where}: expected a list of records (a JSON list, or one object per line) but the file is a JSON "
            f"object with {describe_keys(value)}; records wrapped in an object are not unwrapped: write the "
            "list itself, or, for PathMMU's release files (an object of splits), use record_style: pathmmu_release",
            "bad_file",
        )
    if not isinstance(value, list):
        raise DataValidationError(
            f"{where}: expected a list of records but the file holds a JSON {json_kind(value)}", "bad_file"
        )
    for index, row in enumerate(value):
        if not isinstance(row, Mapping):
            raise DataValidationError(
                f"{where}: row {index} is a JSON {json_kind(row)} ({str(row)[:60]!r}), not an object (a record)",
                "bad_file",
            )
    return value


def describe_keys(value: Mapping[str, Any], limit: int = 6) -> str:
    """``key(s) 'questions' (a list of 12)``: what an object holds, for messages."""
    shown = []
    for key, inner in list(value.items())[:limit]:
        size = f" of {len(inner)}" if isinstance(inner, (list, Mapping)) else ""
        shown.append(f"{key!r} (a {json_kind(inner)}{size})")
    more = f" and {len(value) - limit} more" if len(value) > limit else ""
    return f"key(s) {', '.join(shown)}{more}" if shown else "no keys"


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of any row, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def read_source(file: Path, image_column: str | None = None) -> RowSource:
    """The rows of one .json/.jsonl/.parquet file or ``save_to_disk`` folder. ``image_column``: a
    column of embedded images is read as ``{"bytes", "path"}`` (the loader writes the bytes to files)."""
    suffix = file.suffix.lower()
    if suffix in JSON_SUFFIXES and not file.is_dir():
        rows = check_rows(str(file), read_json(file))
        return RowSource(file, rows, columns_of(rows))
    if file.is_dir():
        table = datasets.load_from_disk(str(file))
        if isinstance(table, datasets.DatasetDict):
            if len(table) != 1:
                raise ValueError(
                    f"{file} holds the splits {sorted(table)}; point data_path at one of them, "
                    f"e.g. {file / next(iter(table))}"
                )
            table = next(iter(table.values()))
    elif suffix == ".parquet":
        if file.stat().st_size == 0:
            raise DataValidationError(f"{file}: is empty", "bad_file")
        try:
            table = datasets.load_dataset("parquet", data_files=str(file), split="train")
        except Exception as err:  # pyarrow and datasets raise several types for a broken file
            raise DataValidationError(f"{file}: cannot be read as parquet: {err}", "bad_file") from err
    else:
        raise ValueError(f"data file {str(file)!r}: expected .json, .jsonl, .parquet or a saved dataset folder")
    if image_column is not None and isinstance(table.features.get(image_column), datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    return RowSource(file, table, list(table.column_names))
