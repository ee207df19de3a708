"""A run resumed from a mid-epoch checkpoint continues exactly like the uninterrupted run.

Each test fits 4 steps once, with a checkpoint after step 2 (what a crash at step 3 leaves), then
fits a freshly built module from that checkpoint up to step 4. With 8 training records in batches
of 2 an epoch is 4 batches, so the checkpoint lies mid-epoch: the resumed run must continue with the
epoch's third batch (not restart the epoch), sample with the RNG state of step 2 (RolloutCallback's
state) and restore optimizer and scheduler, or its steps 3-4 differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks import ReferenceModelCallback, RewardCallback, RolloutCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule, SFTModule, WarmupCosineLR
from tests.fit_support import MemoryLogger, make_datamodule, parameters, trainer_kwargs


class LengthReward(RewardCallback):
    """A tenth of the completion's character count (spread between random completions)."""

    default_name = "length"

    def score_text(self, completion: str, record: VQARecord) -> float:
        return len(completion) / 10


class BatchIds(pl.Callback):
    """The record ids of every training batch, in order."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append([r.id for r in batch["records"]])


def sft_module() -> SFTModule:
    return SFTModule(
        Backbone("embedded-tiny", seed=0),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(WarmupCosineLR, total_steps=4, warmup_steps=1),
    )


def grpo_module() -> GRPOModule:
    return GRPOModule(
        Backbone("embedded-tiny", seed=0),
        RolloutCallback(num_generations=4, max_new_tokens=8),
        [LengthReward()],
        ReferenceModelCallback(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        loss=GRPOLoss(beta=0.04),
        log_completions_every_n_steps=0,
    )


def fit(
    root: Path,
    build: Callable[[], pl.LightningModule],
    batch_kind: str,
    callbacks: list[pl.Callback],
    ckpt_path: Path | None = None,
) -> tuple[pl.LightningModule, MemoryLogger, BatchIds]:
    """4 steps from scratch (checkpointing every 2 steps into ``root/ckpt``), or from ``ckpt_path``."""
    pl.seed_everything(0)
    module = build()
    memory, batches = MemoryLogger(), BatchIds()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        **trainer_kwargs(
            root, max_steps=4, logger=memory, callbacks=[*callbacks, batches, checkpoint], enable_checkpointing=True
        )
    )
    datamodule = make_datamodule(root, module.backbone.processor, batch_kind)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    assert trainer.global_step == 4
    return module, memory, batches


def assert_resume_matches(
    tmp_path: Path, build: Callable[[], pl.LightningModule], batch_kind: str, callbacks: Callable, keys: list[str]
) -> None:
    full, full_log, full_batches = fit(tmp_path / "full", build, batch_kind, callbacks())
    checkpoint = tmp_path / "full" / "ckpt" / "step=2.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir())
    resumed, resumed_log, resumed_batches = fit(tmp_path / "resumed", build, batch_kind, callbacks(), checkpoint)

    # the resumed run sees the epoch's batches 3 and 4, the ones the full run saw after its checkpoint
    assert len({i for ids in full_batches.ids for i in ids}) == 8  # one epoch, every record once
    assert resumed_batches.ids == full_batches.ids[2:]
    for key in keys:
        full_series = [v for step, v in full_log.series(key) if step >= 2]  # steps 3 and 4 (0-based 2, 3)
        resumed_series = [v for _, v in resumed_log.series(key)]
        assert len(full_series) == 2, full_log.series(key)
        assert resumed_series == pytest.approx(full_series, rel=1e-5, abs=1e-7), key
    expected, got = parameters(full.backbone), parameters(resumed.backbone)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_sft_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path: Path) -> None:
    assert_resume_matches(tmp_path, sft_module, "sft", lambda: [], ["train/loss", "train/lr"])


def test_grpo_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path: Path) -> None:
    keys = ["reward/total_mean", "completion/length_mean", "train/loss", "train/kl", "train/lr"]
    assert_resume_matches(tmp_path, grpo_module, "prompt", lambda: [], keys)
