"""The one record type every loader produces: a four-option visual question."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import overload

LETTERS = ("A", "B", "C", "D")
#: ``extra`` key of a teacher-written SFT target (``<think>..</think><answer>..</answer>``) that may
#: differ from the gold answer, as GPT-written chains of thought sometimes do.
DEMONSTRATION_KEY = "demonstration"


@dataclass(frozen=True)
class VQARecord:
    """A multiple-choice visual question with its reference answer.

    ``options`` maps a letter to its text, in letter order (``{"A": "...", "B": "...", ...}``).
    ``answer`` is the correct letter. ``subset`` is the question type or source subset (PathMMU's
    PubMed/EduContent, or a synthetic question type); ``modality`` names the imaging modality
    (used by the out-of-domain tables).
    """

    id: str
    image: str  # path of the image file
    question: str
    options: dict[str, str]
    answer: str  # a key of ``options``
    explanation: str = ""
    subset: str = ""
    modality: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    @property
    def reference(self) -> str:
        """The reference answer as the model must write it: ``B) option text``."""
        return f"{self.answer}) {self.answer_text}"

    @property
    def demonstration(self) -> str:
        """What SFT imitates: the record's teacher demonstration (``extra["demonstration"]``) when it
        has one, else ``<think>{explanation}</think><answer>{reference}</answer>``. Rewards and
        evaluation never read it: they grade against ``answer``."""
        written = self.extra.get(DEMONSTRATION_KEY)
        if written:
            return str(written)
        return f"<think>{self.explanation}</think><answer>{self.reference}</answer>"


class BatchRecords:
    """The records of one batch, in batch order, as one value the batch carries (``batch["records"]``).

    Read it like a tuple (``len``, iteration, indexing; a slice gives a ``BatchRecords``). It is
    deliberately not a sequence, a mapping or a dataclass to Lightning: the functions that walk a
    batch (``apply_to_collection`` in ``batch_to_device`` and in every precision plugin's
    ``convert_input``) recurse into those and rebuild them, and refuse a frozen dataclass such as
    :class:`VQARecord`. An object of none of these kinds passes through unchanged, records and all,
    whatever the device or precision.
    """

    __slots__ = ("_records",)

    def __init__(self, records: Iterable[VQARecord] = ()) -> None:
        self._records = tuple(records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[VQARecord]:
        return iter(self._records)

    @overload
    def __getitem__(self, index: int) -> VQARecord: ...
    @overload
    def __getitem__(self, index: slice) -> BatchRecords: ...
    def __getitem__(self, index: int | slice) -> VQARecord | BatchRecords:
        if isinstance(index, slice):
            return BatchRecords(self._records[index])
        return self._records[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BatchRecords):
            return self._records == other._records
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # records hold dicts

    def __repr__(self) -> str:
        return f"BatchRecords({[r.id for r in self._records]!r})"
