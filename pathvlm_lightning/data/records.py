"""The one record type every loader produces: a four-option visual question."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LETTERS = ("A", "B", "C", "D")


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

    def to(self, *args: Any, **kwargs: Any) -> VQARecord:
        """Return ``self``: a record has no tensors to move.

        Lightning moves every batch with ``.to(device)`` and rebuilds dataclasses that lack one,
        which fails for a frozen dataclass; this lets batches carry their records.
        """
        return self
