"""The two exceptions of data checking, apart from the checks so that every module can raise them.

:class:`InvalidRecord` is one bad record, raised by a check and turned into an error or a counted
skip by :class:`~pathvlm_lightning.data.validation.RecordPolicy`; :class:`DataValidationError` is
what reaches the user, its message naming the file, the record and the problem.
"""

from __future__ import annotations

from typing import Literal

ProblemKind = Literal[
    "missing_field",
    "bad_options",
    "too_few_options",
    "answer_not_in_options",
    "duplicate_id",
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "bad_aspect_ratio",
    "image_outside_root",
    "special_token",
    "too_long",
]


class DataValidationError(ValueError):
    """A record (or a whole split or file) that cannot be used; the message names file, record and problem."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidRecord(Exception):
    """Raised by a check for one record; turned into an error or a skip by ``RecordPolicy``."""

    def __init__(self, kind: ProblemKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
