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
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

# DataValidationError, InvalidRecord and check_image are also imported from here (their home before
# errors.py and images.py).
from pathvlm_lightning.data.errors import DataValidationError, InvalidRecord
from pathvlm_lightning.data.images import ImageLimits, check_image
from pathvlm_lightning.data.records import DEMONSTRATION_KEY, VQARecord

log = logging.getLogger(__name__)

OnInvalid = Literal["error", "skip"]
MIN_OPTIONS = 2


@dataclass
class ValidationReport:
    """What happened to the records of one source: how many were read, kept, and skipped per kind,
    and, for a source of several files or release splits, how many were kept from each."""

    source: str
    seen: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    kept_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items())) or "none"
        text = f"{self.source}: kept {self.kept} of {self.seen} records; skipped {self.num_skipped} ({kinds})"
        if len(self.kept_by_part) > 1:
            text += "; kept by part: " + ", ".join(f"{part} {n}" for part, n in self.kept_by_part.items())
        return text


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


@dataclass(frozen=True)
class RecordChecks:
    """The checks of :func:`check_record` that depend on settings: whether image files are opened,
    the image sizes accepted, and the tokenizer's special tokens that record text must not hold."""

    images: bool = True
    image_limits: ImageLimits = ImageLimits()
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        longest_first = sorted(set(self.special_tokens), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        object.__setattr__(self, "_special", pattern)

    def find_special_token(self, text: str) -> str | None:
        match = self._special.search(text) if self._special is not None else None  # type: ignore[attr-defined]
        return match.group(0) if match else None


def special_tokens_of(processor: Any) -> tuple[str, ...]:
    """The special-token strings of ``processor``'s tokenizer (or of ``processor`` itself, a tokenizer):
    ``all_special_tokens`` and every added token marked special (Qwen's ``<|image_pad|>``, ``<|im_end|>``...)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = set(getattr(tokenizer, "all_special_tokens", ()))
    tokens.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tuple(sorted(t for t in tokens if t))


def record_texts(record: VQARecord) -> Iterator[tuple[str, str]]:
    """``(field, text)`` for every text of ``record`` the tokenizer reads: prompt and SFT target."""
    yield "question", record.question
    for letter, text in record.options.items():
        yield f"option {letter}", text
    yield "explanation", record.explanation
    demonstration = record.extra.get(DEMONSTRATION_KEY)
    if demonstration:
        yield f"extra.{DEMONSTRATION_KEY}", str(demonstration)


def check_special_tokens(record: VQARecord, checks: RecordChecks) -> None:
    """Refuse record text holding a special-token string. Refused, not escaped: the tokenizer would
    read it as the control token itself (``<|image_pad|>`` adds an image slot the collator cannot
    fill, ``<|im_end|>`` ends the SFT labels early), it has no place in a question, and an escape
    would change the text the model is shown and graded on."""
    for name, text in record_texts(record):
        token = checks.find_special_token(text)
        if token is not None:
            raise InvalidRecord(
                "special_token", f"{name} contains the tokenizer's special token {token!r}: remove it from the data"
            )


def check_record(record: VQARecord, checks: RecordChecks = RecordChecks(), image_checked: bool = False) -> None:
    """The checks every record passes, whichever loader built it; ``image_checked``: its image file
    was already checked for an earlier record (a shared image is decoded once)."""
    if len(record.options) < MIN_OPTIONS:
        raise InvalidRecord(
            "too_few_options", f"has {len(record.options)} option(s) {record.options!r}; at least {MIN_OPTIONS} needed"
        )
    if record.answer not in record.options:
        raise InvalidRecord(
            "answer_not_in_options", f"answer {record.answer!r} is not one of the options {sorted(record.options)}"
        )
    check_special_tokens(record, checks)
    if checks.images and not image_checked:
        check_image(record.image, checks.image_limits)


def validate_records(
    records: list[VQARecord], source: str, on_invalid: str = "error", checks: RecordChecks = RecordChecks()
) -> tuple[list[VQARecord], ValidationReport]:
    """Check already-built records (options, answer, image, unique ids); returns the kept ones and the report."""
    policy = RecordPolicy(source, on_invalid)
    kept: list[VQARecord] = []
    first_row: dict[str, int] = {}
    for row, record in enumerate(records):
        policy.report.seen += 1
        try:
            check_record(record, checks)
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
