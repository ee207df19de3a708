"""``GRPOModule(micro_batch_size=...)``: slices of whole groups, gradients accumulated, one step.

Two seeded fits of the tiny model see the same rollouts (sampling does not depend on how the
log-prob passes are cut), one with the whole rollout (8 completions) in one pass, one in slices of
4 completions (2 groups of G=4 -> 2 slices), the reference pass sliced the same way. Every loss
normaliser is counted over the whole step, so the gradients at every optimizer step must agree.

Tolerance: float32, same kernels on different row counts, and a sum of two partial sums instead of
one. Measured (bnpo, 4 steps): max |difference| 4.1e-8 against gradients up to 9.7e-2, at most
4.8e-6 of the largest entry of the same tensor. Bound: per tensor, max |difference| <= 5e-5 x its
largest entry; a normaliser counted per slice instead of per step is off by a factor of ~2
(bnpo/dapo: each slice's own token count; grpo/dr_grpo: its own completion count), far outside.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks import ReferenceModelCallback
from pathvlm_lightning.grpo.losses import CISPOLoss, GRPOLoss, GSPOLoss, SAPOLoss
from pathvlm_lightning.modules import GRPOModule
from tests.fit_support import MemoryLogger, make_datamodule, trainer_kwargs
from tests.test_grpo_module import G, LengthReward, rollout_callback

GRAD_REL = 5e-5  # of each tensor's largest entry
LR = 0.3  # SGD: large enough for ratios to leave the clip range in the second iteration
STATS = ("train/loss", "train/policy_loss", "train/kl", "train/clip_low_frac", "train/clip_high_frac", "train/ratio_mean")


class GradientRecorder(pl.Callback):
    """A copy of every trainable parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.steps.append(grads)


def fit(root: Path, loss: str, micro_batch_size: int | None) -> tuple[GradientRecorder, MemoryLogger, GRPOModule]:
    """2 rollouts x 2 iterations (so the second pass has old log-probs and clipping can trigger),
    full fine-tuning with a frozen reference."""
    pl.seed_everything(0)
    module = GRPOModule(
        Backbone("embedded-tiny", seed=0),
        rollout_callback(),
        [LengthReward()],
        ReferenceModelCallback(),
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        loss=LOSSES[loss](),
        num_iterations=2,
        max_grad_norm=None,
        micro_batch_size=micro_batch_size,
        log_completions_every_n_steps=0,
        eval_max_new_tokens=8,
    )
    recorder, memory = GradientRecorder(), MemoryLogger()
    trainer = pl.Trainer(**trainer_kwargs(root, max_steps=4, logger=[memory], callbacks=[recorder]))
    trainer.fit(module, datamodule=make_datamodule(root, module.backbone.processor, "prompt"))
    return recorder, memory, module


# Every loss class (GRPO by aggregation), each with the KL term on; GSPO's and CISPO's clip ranges are
# the paper's (GSPO) or narrow enough (CISPO 1.2) that the second iteration's ratios cross them.
LOSSES = {
    **{name: functools.partial(GRPOLoss, aggregation=name, beta=0.04) for name in ("grpo", "bnpo", "dr_grpo", "dapo")},
    "gspo": functools.partial(GSPOLoss, beta=0.04),
    "cispo": functools.partial(CISPOLoss, epsilon_low=0.2, epsilon_high=0.2, beta=0.04),
    "sapo": functools.partial(SAPOLoss, beta=0.04),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_micro_batches_give_the_full_batch_gradient_and_stats(tmp_path: Path, loss: str) -> None:
    whole, whole_log, _ = fit(tmp_path / "whole", loss, None)
    sliced, sliced_log, _ = fit(tmp_path / "sliced", loss, G)
    assert len(whole.steps) == len(sliced.steps) == 4
    for step, (expected, got) in enumerate(zip(whole.steps, sliced.steps)):
        assert expected.keys() == got.keys() and expected
        for name in expected:
            scale = expected[name].abs().max().item()
            assert (got[name] - expected[name]).abs().max().item() <= GRAD_REL * scale, (step, name)
    assert max(g.abs().max().item() for g in whole.steps[-1].values()) > 1e-3  # gradients are not ~0
    for key in STATS:  # logged once per rollout (its last iteration's)
        expected = [v for _, v in whole_log.series(key)]
        assert len(expected) == 2
        assert [v for _, v in sliced_log.series(key)] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    # the comparison covers the KL term and clipping, not only their trivial values
    assert max(v for _, v in whole_log.series("train/kl")) > 0
    clipped = [v for key in ("train/clip_low_frac", "train/clip_high_frac") for _, v in whole_log.series(key)]
    assert max(clipped) > 0 if loss != "sapo" else max(clipped) == 0  # SAPO has no hard clip


def test_micro_batch_size_is_checked() -> None:
    parts = dict(backbone=Backbone("embedded-tiny"), rollout=rollout_callback(), rewards=[LengthReward()])
    with pytest.raises(ValueError, match=r"micro_batch_size counts completions .* got 0"):
        GRPOModule(**parts, micro_batch_size=0, loss=GRPOLoss(beta=0.0))
    with pytest.raises(ValueError, match=r"micro_batch_size=6 must be a multiple of the rollout's num_generations=4"):
        GRPOModule(**parts, micro_batch_size=6, loss=GRPOLoss(beta=0.0))  # when built, before any fit
