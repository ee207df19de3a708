"""Progress a log file can show: plain lines for batch jobs, and the epoch display of the bar.

Under ``nohup`` or a scheduler stdout is a file, and Lightning's live progress bar draws only its
last frame there, so a long fit prints nothing between the model summary and the end.
:class:`ProgressLog` prints one line every few steps instead (``python -m pathvlm_lightning`` adds
it to every run as ``--progress.*``). :class:`EpochProgressBar` is Lightning's rich bar without the
``Epoch 0/-2`` it shows when a fit is bounded by ``max_steps`` (``max_epochs`` is then -1).
"""

from __future__ import annotations

import math
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

#: (label, logged metric) in the order a progress line shows them; absent metrics are left out.
PROGRESS_METRICS = (
    ("loss", "train/loss"),
    ("reward", "reward/total_mean"),
    ("accuracy", "reward/accuracy"),
    ("kl", "train/kl"),
    ("skipped", "groups/skipped_steps"),  # GRPO steps with no reward variance anywhere: no optimizer step
)


def format_duration(seconds: float) -> str:
    """``125.0`` -> ``"2m05s"``; ``3725.0`` -> ``"1h02m"``.

    >>> format_duration(42.4), format_duration(125.0), format_duration(3725.0)
    ('42s', '2m05s', '1h02m')
    """
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(
    step: int, total: float, metrics: dict[str, float], seconds_per_step: float | None
) -> str:
    """``step 20/60 | loss 0.1234 | reward 0.812 | ... | 3.21 s/step | ETA 2m08s``.

    >>> progress_line(20, 60, {"train/loss": 0.5, "reward/accuracy": 0.25}, 2.0)
    'step 20/60 | loss 0.5 | accuracy 0.25 | 2.00 s/step | ETA 1m20s'
    """
    known_total = math.isfinite(total) and total > 0
    parts = [f"step {step}/{int(total)}" if known_total else f"step {step}"]
    parts += [f"{label} {metrics[key]:.4g}" for label, key in PROGRESS_METRICS if key in metrics]
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
        if known_total:
            parts.append(f"ETA {format_duration(max(total - step, 0) * seconds_per_step)}")
    return " | ".join(parts)


class ProgressLog(Callback):
    """Print :func:`progress_line` every ``every_n_steps`` optimizer steps of ``fit`` and at its end (0: never).

    Only when stdout is not a terminal, unless ``on_terminal`` (a terminal has the progress bar);
    only on global rank 0. Seconds per step are measured from the fit's first step in this process,
    so a resumed fit's rate excludes the time before it resumed.

    Args:
        every_n_steps: print a line every this many optimizer steps (0: no lines).
        on_terminal: print the lines on a terminal too (by default only when stdout is a file or pipe).
    """

    def __init__(self, every_n_steps: int = 10, on_terminal: bool = False) -> None:
        if every_n_steps < 0:
            raise ValueError(f"ProgressLog: every_n_steps must be >= 0 (0 turns it off), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.on_terminal = on_terminal
        self._active = False
        self._start: tuple[float, int] = (0.0, 0)  # (monotonic seconds, global step) when training started
        self._last_step = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        to_terminal = sys.stdout.isatty()
        self._active = self.every_n_steps > 0 and trainer.is_global_zero and (self.on_terminal or not to_terminal)
        self._start = (time.monotonic(), trainer.global_step)
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._active and trainer.global_step != self._last_step and trainer.global_step % self.every_n_steps == 0:
            self._print(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and trainer.global_step != self._last_step:  # the last step, when it fell between lines
            self._print(trainer)

    def _print(self, trainer: pl.Trainer) -> None:
        step = self._last_step = trainer.global_step
        started, first_step = self._start
        done = step - first_step
        rate = (time.monotonic() - started) / done if done > 0 else None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        print(progress_line(step, trainer.estimated_stepping_batches, metrics, rate), flush=True)


class EpochProgressBar(RichProgressBar):
    """Lightning's rich progress bar; ``Epoch 3`` rather than ``Epoch 3/-2`` when ``max_epochs`` is -1."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # The parent pads to the validation bar's width so the two descriptions do not flicker.
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
