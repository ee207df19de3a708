"""The one record type every loader produces: a four-option visual question."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def to(self, *args: Any, **kwargs: Any) -> VQARecord:
        """Return ``self``: a record has no tensors to move.

        Lightning moves every batch with ``.to(device)`` and rebuilds dataclasses that lack one,
        which fails for a frozen dataclass; this lets batches carry their records.
        """
        return self
