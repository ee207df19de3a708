"""glibc's mmap threshold: pinned once per process by the first CPU generation, with an opt-out.

The allocator is replaced by a recorder, so nothing here changes the test process's own malloc and
nothing depends on memory measurements (those are in ``benchmarks/README.md``, benchmark (b)).
"""

from __future__ import annotations

import pytest
import torch

from pathvlm_lightning.backbone import allocator
from tests.test_generation import _text_prompts


class _Recorder:
    """Stands in for glibc: records ``mallopt`` calls and answers like glibc (1: done)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def libc(monkeypatch) -> _Recorder:
    recorder = _Recorder()
    monkeypatch.setattr(allocator, "_result", None)  # as in a fresh process
    monkeypatch.setattr(allocator, "_glibc", lambda: recorder)
    for name in (allocator.ENV, "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return recorder


def test_the_threshold_is_pinned_once_per_process(libc):
    assert allocator.pin_mmap_threshold() is True
    assert allocator.pin_mmap_threshold() is True
    assert libc.calls == [(-3, 4 * 1024 * 1024)]  # M_MMAP_THRESHOLD, 4 MiB, a single call


def test_the_env_variable_sets_the_size_or_opts_out(libc, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "8388608")
    assert allocator.pin_mmap_threshold() is True
    assert libc.calls == [(-3, 8388608)]
    for off in ("off", "0", "OFF"):
        monkeypatch.setattr(allocator, "_result", None)
        monkeypatch.setenv(allocator.ENV, off)
        assert allocator.pin_mmap_threshold() is False
    assert len(libc.calls) == 1
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setenv(allocator.ENV, "4MB")
    with pytest.raises(ValueError, match="PATHVLM_MMAP_THRESHOLD='4MB'"):
        allocator.pin_mmap_threshold()


@pytest.mark.parametrize(
    "name, value", [("MALLOC_MMAP_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")]
)
def test_the_users_own_glibc_setting_is_left_alone(libc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.pin_mmap_threshold() is False
    assert libc.calls == []


def test_nothing_is_called_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator._glibc() is None
    assert allocator.pin_mmap_threshold() is False
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator._glibc() is None


def test_cpu_generation_pins_it_on_its_first_call_only(libc, tiny_backbone):
    backbone = tiny_backbone()
    inputs = _text_prompts(backbone.processor)
    for _ in range(2):
        torch.manual_seed(0)
        backbone.generate_with_logprobs(inputs, num_generations=2, max_new_tokens=3)
    assert libc.calls == [(-3, allocator.DEFAULT_THRESHOLD)]


def test_cpu_generation_respects_the_opt_out(libc, tiny_backbone, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "off")
    backbone = tiny_backbone()
    torch.manual_seed(0)
    out = backbone.generate_with_logprobs(_text_prompts(backbone.processor), num_generations=2, max_new_tokens=3)
    assert out.ids.shape[0] == 4 and libc.calls == []
