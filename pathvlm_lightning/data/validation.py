"""What counts as a bad record, and what happens to one.

A dataset of a few thousand questions always has a few broken rows: an image that was never
copied, a truncated download, an answer that matches none of the options. Training on them
quietly would bias accuracy, and dropping them quietly would change the split without anyone
knowing. So every problem either stops the run with a message naming the file, the record and the
problem (``on_invalid="error"``, the default), or, with ``on_invalid="skip"``, the record is left
out, logged with that same message and counted per kind in a :class:`ValidationReport`. An empty
split always stops the run: no setting makes an empty stage meaningful.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from pathvlm_lightning.data.records import VQARecord

log = logging.getLogger(__name__)

OnInvalid = Literal["error", "skip"]
ProblemKind = Literal[
    "missing_field",
    "bad_options",
    "too_few_options",
    "answer_not_in_options",
    "duplicate_id",
    "missing_image",
    "corrupt_image",
    "too_long",
]
MIN_OPTIONS = 2


class DataValidationError(ValueError):
    """A record (or a whole split) that cannot be used; the message names file, record and problem."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidRecord(Exception):
    """Raised by the checks below for one record; turned into an error or a skip by :class:`RecordPolicy`."""

    def __init__(self, kind: ProblemKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass
class ValidationReport:
    """What happened to the records of one source: how many were read, kept, and skipped per kind."""

    source: str
    seen: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items())) or "none"
        return f"{self.source}: kept {self.kept} of {self.seen} records; skipped {self.num_skipped} ({kinds})"


def check_on_invalid(on_invalid: str) -> OnInvalid:
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    return on_invalid  # type: ignore[return-value]


def describe(record_id: str | None, row: int | None) -> str:
    """``record 'abc' (row 3)``: how messages point at a record."""
    parts = []
    if record_id is not None:
        parts.append(f"record {record_id!r}")
    if row is not None:
        parts.append(f"(row {row})" if parts else f"row {row}")
    return " ".join(parts) or "record"


class RecordPolicy:
    """Applies ``on_invalid`` to the problems of one source and keeps its :class:`ValidationReport`."""

    def __init__(self, source: str, on_invalid: str = "error") -> None:
        self.on_invalid = check_on_invalid(on_invalid)
        self.report = ValidationReport(source=source)

    def handle(self, problem: InvalidRecord, record_id: str | None, row: int | None) -> None:
        """Raise :class:`DataValidationError` (error) or log and count the skipped record (skip)."""
        message = f"{self.report.source}: {describe(record_id, row)}: {problem.detail}"
        if self.on_invalid == "error":
            raise DataValidationError(message, problem.kind) from problem
        self.report.skipped[problem.kind] += 1
        self.report.messages.append(message)
        log.warning("skipped %s", message)


def check_image(path: str) -> None:
    """Raise :class:`InvalidRecord` unless ``path`` is an image PIL can fully decode.

    ``verify`` catches broken PNG chunks but not a truncated JPEG, so the image is also decoded;
    ``draft`` lets JPEGs decode at reduced scale, which still reads every byte of the file.
    """
    if not os.path.isfile(path):
        raise InvalidRecord("missing_image", f"image file {path!r} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
        raise InvalidRecord("corrupt_image", f"image file {path!r} cannot be read: {err}") from err


def check_record(record: VQARecord, check_images: bool = True) -> None:
    """The checks every record passes, whichever loader built it."""
    if len(record.options) < MIN_OPTIONS:
        raise InvalidRecord(
            "too_few_options", f"has {len(record.options)} option(s) {record.options!r}; at least {MIN_OPTIONS} needed"
        )
    if record.answer not in record.options:
        raise InvalidRecord(
            "answer_not_in_options", f"answer {record.answer!r} is not one of the options {sorted(record.options)}"
        )
    if check_images:
        check_image(record.image)


def validate_records(
    records: list[VQARecord], source: str, on_invalid: str = "error", check_images: bool = True
) -> tuple[list[VQARecord], ValidationReport]:
    """Check already-built records (options, answer, image, unique ids); returns the kept ones and the report."""
    policy = RecordPolicy(source, on_invalid)
    kept: list[VQARecord] = []
    first_row: dict[str, int] = {}
    for row, record in enumerate(records):
        policy.report.seen += 1
        try:
            check_record(record, check_images)
            check_unique_id(record.id, row, first_row)
        except InvalidRecord as problem:
            policy.handle(problem, record.id, row)
            continue
        kept.append(record)
    policy.report.kept = len(kept)
    return kept, policy.report


def check_unique_id(record_id: str, row: int, first_row: dict[str, int]) -> None:
    """Remember ``record_id`` at ``row``; raise :class:`InvalidRecord` when it was seen before."""
    if record_id in first_row:
        raise InvalidRecord("duplicate_id", f"duplicate id {record_id!r} (first seen at row {first_row[record_id]})")
    first_row[record_id] = row


def require_nonempty(records: list, split: str, source: str) -> None:
    """An empty split always raises, whatever ``on_invalid`` says."""
    if not records:
        raise DataValidationError(f"{source}: split {split!r} has no records", "empty_split")
