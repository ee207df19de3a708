"""Data: records, loaders and their checks, image-grouped splits, prompts, collation, the DataModule.

Names are imported on first use (PEP 562), so ``from pathvlm_lightning.data.records import
VQARecord`` in a reward function does not pull in ``datasets``, torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "VQARecord": "records",
    "BatchRecords": "records",
    "LETTERS": "records",
    "FieldMap": "loaders",
    "LoadResult": "loaders",
    "RECORD_STYLES": "loaders",
    "load_records": "loaders",
    "read_table": "loaders",
    "parse_options": "loaders",
    "resolve_answer": "loaders",
    "DataValidationError": "errors",
    "ValidationReport": "validation",
    "RecordChecks": "validation",
    "validate_records": "validation",
    "ImageLimits": "images",
    "load_image": "images",
    "DEFAULT_SPLIT_SIZES": "splits",
    "SplitManifest": "splits",
    "SplitMismatchError": "splits",
    "assign_splits": "splits",
    "prepare_splits": "splits",
    "read_split": "splits",
    "PROMPT_TEMPLATE": "prompt",
    "build_prompt": "prompt",
    "build_prompt_messages": "prompt",
    "sft_target": "prompt",
    "IGNORE_INDEX": "collate",
    "SFTCollator": "collate",
    "PromptCollator": "collate",
    "VQADataModule": "datamodule",
    "EMBEDDED_SPLIT_SIZES": "datamodule",
    "ensure_embedded_dataset": "synthetic",
    "ensure_ood_dataset": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
