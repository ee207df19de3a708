"""Benchmark helper: a Lightning callback printing each training step's wall and CPU seconds as JSON lines.

Named on the command line by ``real_vocab_fit.py`` (``--trainer.callbacks+=_step_timer.StepTimer`` with
``benchmarks/`` on ``PYTHONPATH``); not meant to be used by hand.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lightning.pytorch import Callback


class StepTimer(Callback):
    """Prints ``{"step_timer": {"step", "wall", "cpu"}}`` after every training batch (CPU: this process, all threads)."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        print(json.dumps({"step_timer": {"step": trainer.global_step, "wall": wall, "cpu": cpu}}), flush=True)
