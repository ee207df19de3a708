"""Shared fixtures: the embedded tiny processor and backbones, built offline in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pathvlm_lightning.backbone import Backbone, TinyQwenVLProcessor, build_tiny_processor


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU-only machines")


@pytest.fixture(scope="session")
def tiny_processor() -> TinyQwenVLProcessor:
    """The embedded tokenizer + image processor (treat as read-only: shared by the whole session)."""
    return build_tiny_processor()


@pytest.fixture
def tiny_backbone() -> Callable[..., Backbone]:
    """Factory for a fresh embedded backbone; keyword arguments go to :class:`Backbone`.

    ``tiny_backbone()`` is the float32 tiny model with seed 0 and a frozen vision tower;
    ``tiny_backbone(lora=LoraOptions(r=4))`` adds adapters. Each call builds new weights (~0.1 s).
    """

    def build(**kwargs) -> Backbone:
        kwargs.setdefault("model", "embedded-tiny")
        return Backbone(**kwargs)

    return build


# The scripted loopback OpenAI-protocol server and a fake judge key, for any test that needs a judge.
from tests.judge_server import judge_key, judge_server  # noqa: E402, F401
