"""Completion ids back to text."""

from __future__ import annotations

from typing import Any

import torch


def decode_completions(processor: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each completion ``[N, L]`` up to its first EOS (``mask``), special tokens removed."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids, mask)]
    return processor.batch_decode(rows, skip_special_tokens=True)
