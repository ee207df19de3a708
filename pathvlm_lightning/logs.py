"""What a ``python -m pathvlm_lightning`` run prints through :mod:`logging`.

The project's own lines (``pathvlm_lightning.*``: split summaries, "wrote splits to ...", the
validation summary, prompt-sharing fallbacks) go to stderr at ``--log_level`` (INFO by default),
so they reach the console and any file the output is sent to (the pipeline's per-stage ``.log``).
Third-party loggers that speak at INFO on every run (transformers, Lightning, httpx, ...) are held
at WARNING, so their warnings and errors still show.
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers held at WARNING: they print routine INFO lines on every run.
QUIET = ("transformers", "lightning", "lightning.pytorch", "lightning.fabric", "httpx", "httpcore", "openai", "urllib3")
_FLAG = "--log_level"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (redacted wrappers, pytest's capture)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def pop_log_level(args: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--log_level`` given, if any, ``args`` without it), wherever it stands.

    >>> pop_log_level(["fit", "--log_level", "debug", "--config", "x.yaml"])
    ('DEBUG', ['fit', '--config', 'x.yaml'])
    >>> pop_log_level(["fit", "--log_level=WARNING"])
    ('WARNING', ['fit'])
    """
    level, rest = None, []
    i = 0
    while i < len(args):
        if args[i] == _FLAG and i + 1 < len(args):
            level = args[i + 1]
            i += 2
            continue
        if args[i].startswith(_FLAG + "="):
            level = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    if level is not None and level.upper() not in LEVELS:
        raise SystemExit(f"error: --log_level {level!r} is not one of {', '.join(LEVELS)}")
    return (level.upper() if level is not None else None), rest


def configure_logging(level: str | None = None) -> None:
    """Project lines to stderr at ``level`` (INFO when ``None`` and not configured before); idempotent."""
    project = logging.getLogger("pathvlm_lightning")
    handler = next((h for h in project.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        project.addHandler(handler)
        level = level or "INFO"
    if level is not None:
        project.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's rank-zero INFO lines are mostly noise ("GPU available", tips), but the lines that
    # say which checkpoint a run restored are what a user resuming after a crash needs to see.
    rank_zero = logging.getLogger(_LIGHTNING_RANK_ZERO)
    rank_zero.setLevel(logging.INFO)
    if not any(isinstance(f, _RestoreLinesOnly) for f in rank_zero.filters):
        rank_zero.addFilter(_RestoreLinesOnly())


_LIGHTNING_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"
_RESTORE_PREFIXES = ("Restoring states from", "Restored all states from", "Loaded model weights from")


class _RestoreLinesOnly(logging.Filter):
    """Lets Lightning's rank-zero warnings through, and of its INFO lines only those about restoring."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(record.msg).startswith(_RESTORE_PREFIXES)
