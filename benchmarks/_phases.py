"""Phase timing of ``gpu_step.py``'s GRPO steps: a Lightning callback that wraps public entry points of
one run's own objects (see ``gpu_step.py``'s docstring), and the warm-up length schedule."""

from __future__ import annotations

import time
from functools import wraps
from typing import Any

import torch
from lightning import Callback, Trainer

from pathvlm_lightning.callbacks import RolloutCallback

PHASES = ("generation", "reference", "policy_forward", "policy_backward", "optimizer")
LOGGED = ("rollout/sharing_mode", "rollout/sampler_kl")  # read when the module logs them, else null


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock(Callback):
    """Seconds of every training step and of its phases (see ``gpu_step.py``), peak GPU memory
    of the timed steps, completion tokens and the logged :data:`LOGGED` values per step.

    Wraps ``owner.name`` on the given instances only; a timed call made inside another timed call
    (the reference's ``token_logprobs``) counts for the outer one.
    """

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, float] = {}
        self._open = False
        self._start = 0.0
        self._tokens = 0

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._open:
                return original(*args, **kwargs)
            self._open = True
            _sync(self.device)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                _sync(self.device)
            finally:
                self._open = False
            self._current[phase] = self._current.get(phase, 0.0) + time.perf_counter() - start
            if phase == "generation":
                self._tokens += int(result.completion_mask.sum())
            return result

        setattr(owner, name, timed)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(lambda *_: self._optimizer_edge(start=True))
            optimizer.register_step_post_hook(lambda *_: self._optimizer_edge(start=False))

    def _optimizer_edge(self, start: bool) -> None:
        _sync(self.device)
        if start:
            self._optimizer_start = time.perf_counter()
        else:
            self._current["optimizer"] = self._current.get("optimizer", 0.0) + time.perf_counter() - self._optimizer_start

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._current, self._tokens = {}, 0
        _sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        _sync(self.device)
        seconds = time.perf_counter() - self._start
        phases = {phase: self._current.get(phase, 0.0) for phase in PHASES}
        metrics = trainer.callback_metrics
        self.steps.append({
            "warmup": batch_idx < self.warmup,
            "step_seconds": seconds,
            "phases": {**phases, "other": seconds - sum(phases.values())},
            "completion_tokens": self._tokens,
            "logged": {name: _plain(metrics.get(name)) for name in LOGGED},
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
        })


def _plain(value: Any) -> Any:
    """A logged metric as JSON: tensors as floats, strings as they are, absent as null."""
    if value is None:
        return None
    return float(value) if isinstance(value, torch.Tensor) else value


class LengthSchedule(Callback):
    """Sets the rollout's forced completion length for each step from ``lengths`` (warm-up steps short)."""

    def __init__(self, rollout: RolloutCallback, lengths: Any) -> None:
        self.rollout, self.lengths = rollout, lengths

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        length = next(self.lengths)
        self.rollout.max_new_tokens = self.rollout.min_new_tokens = length
