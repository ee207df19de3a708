"""Helpers for the short fits of the module, resume and CLI tests (helpers only; no tests here).

Every fit runs on CPU in a few seconds: the embedded tiny model, 16 synthetic records, 2-4 steps,
every artefact under the test's ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback
from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import generate_dataset

#: 8 records to train on (2-4 batches), the rest (about 8) to test on; no validation split.
SPLIT_SIZES: dict[str, int | None] = {"train": 8, "test": None}


def make_records(root: Path, num_records: int = 16, seed: int = 0) -> Path:
    """The synthetic tissue set written once under ``root`` (re-used when it is already there)."""
    path = root / "records.jsonl"
    if not path.exists():
        generate_dataset(root, num_records, seed)
    return path


def make_datamodule(
    tmp_path: Path,
    processor: Any,
    batch_kind: str,
    batch_size: int = 2,
    seed: int = 0,
    **kwargs: Any,
) -> VQADataModule:
    """A VQADataModule over :func:`make_records` with its own split folder under ``tmp_path``."""
    kwargs.setdefault("split_sizes", SPLIT_SIZES)
    kwargs.setdefault("val_split", None)
    kwargs.setdefault("test_split", "test")
    return VQADataModule(
        data_path=str(make_records(tmp_path / "data")),
        split_dir=str(tmp_path / "splits"),
        train_split="train",
        batch_size=batch_size,
        batch_kind=batch_kind,
        processor=processor,
        seed=seed,
        **kwargs,
    )


def split_parts(callbacks: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """``callbacks`` sorted out for a test: the GRPO parts as ``GRPOModule`` keyword arguments
    (``rollout``, ``rewards``, ``reference``; the rollout None when there is none, so the module's
    check says so) and every other callback, for the trainer."""
    parts: dict[str, Any] = {"rollout": None, "rewards": [], "reference": None}
    others = []
    for callback in callbacks:
        if isinstance(callback, RolloutCallback):
            parts["rollout"] = callback
        elif isinstance(callback, RewardCallback):
            parts["rewards"].append(callback)
        elif isinstance(callback, ReferenceModelCallback):
            parts["reference"] = callback
        else:
            others.append(callback)
    return parts, others


def trainer_kwargs(root: Path, max_steps: int = 2, **overrides: Any) -> dict[str, Any]:
    """Trainer settings for a quiet CPU fit writing only under ``root`` (no logger, no checkpoints)."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``: the per-step history of a fit."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    @rank_zero_experiment
    def experiment(self) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((int(step or 0), {k: float(v) for k, v in metrics.items()}))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged ``key``, in logging order."""
        return [(step, m[key]) for step, m in self.history if key in m]

    def keys(self) -> set[str]:
        return {k for _, m in self.history for k in m}


def tensorboard_events(log_dir: str | Path) -> EventAccumulator:
    """The TensorBoard events under ``log_dir`` (the folder holding ``events.out.tfevents.*``)."""
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {log_dir}")
    accumulator = EventAccumulator(str(files[0].parent), size_guidance={"tensors": 0, "scalars": 0})
    return accumulator.Reload()


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name (to compare before/after a fit)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class LengthReward(RewardCallback):
    """A tenth of the completion's character count: random completions differ, so GRPO steps train
    (``--model.init_args.rewards+=tests.fit_support.LengthReward`` in a CLI test)."""

    default_name = "length"

    def score_text(self, completion: str, record: VQARecord) -> float:
        return len(completion) / 10
