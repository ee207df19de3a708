"""Benchmark child: our GRPO step, a real ``GRPOModule`` and its callbacks under ``lightning.Trainer``.

Started by ``grpo_vs_trl.py``; not meant to be run by hand. Each optimizer step is exactly what
``GRPOModule.training_step`` does in training (rollout -> rewards -> reference -> loss -> backward
-> clip -> AdamW), with the same callbacks a config would list.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from _lockstep import StepGate
from _settings import child_start, read_records
from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback, RolloutCallback
from pathvlm_lightning.data.collate import PromptCollator
from pathvlm_lightning.data.datamodule import RecordDataset
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule


class _LockstepCallback(Callback):
    """Hands control to the parent before the first step and after every optimizer step."""

    def __init__(self, gate: StepGate) -> None:
        self._gate = gate
        self.prompt_tokens = 0

    def on_train_start(self, trainer: Trainer, pl_module: GRPOModule) -> None:
        params = list(pl_module.parameters())
        self._gate.ready(
            {
                "parameters": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: GRPOModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        self.prompt_tokens = batch["prompt_inputs"]["input_ids"].shape[1]  # padded prompt width P
        self._gate.step_done()


def main() -> None:
    settings, report_fd = child_start("our GRPO step (benchmark child)")
    gate = StepGate(report_fd, settings.total_steps)
    backbone = Backbone(
        model=settings.model_dir,
        dtype="float32",
        freeze_vision=True,
        share_prompts=settings.share_prompts,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    rollout = RolloutCallback(
        num_generations=settings.num_generations,
        max_new_tokens=settings.completion_length,
        min_new_tokens=settings.completion_length,
        temperature=settings.temperature,
    )
    module = GRPOModule(
        backbone,
        rollout,
        [FormatReward(), AccuracyReward()],
        ReferenceModelCallback() if settings.beta > 0 else None,
        optimizer=partial(torch.optim.AdamW, lr=settings.learning_rate, weight_decay=0.0),
        loss=GRPOLoss(
            aggregation=settings.loss_type, beta=settings.beta, epsilon_low=settings.epsilon, epsilon_high=settings.epsilon
        ),
        scale_rewards="group",
        num_iterations=1,
        max_grad_norm=settings.max_grad_norm,
        skip_zero_advantage_steps=False,  # TRL steps on every rollout: the same work on both sides
        log_completions_every_n_steps=0,
    )
    lockstep = _LockstepCallback(gate)
    callbacks = [lockstep]  # the rollout, rewards and reference are the module's
    loader = DataLoader(
        RecordDataset(read_records(settings.records_path)),
        batch_size=settings.prompts_per_step,
        shuffle=False,  # TRL's side runs with shuffle_dataset=False: the same prompts in the same order
        collate_fn=PromptCollator(backbone.processor),
    )
    trainer = Trainer(
        max_steps=settings.total_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    metrics = trainer.callback_metrics
    gate.finish(
        {
            "completion_length_mean": float(metrics["completion/length_mean"]),
            "prompt_tokens": lockstep.prompt_tokens,
            "loss": float(metrics["train/loss"]),
        }
    )


if __name__ == "__main__":
    main()
