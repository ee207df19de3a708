"""GRPOModule end to end on the tiny model: short fits with the real parts (rollout, rewards, reference).

Rewards here are test stand-ins with guaranteed spread (a random tiny model never earns the paper's
format or accuracy reward, so those alone would give all-zero advantages and teach nothing).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from pathvlm_lightning.backbone import Backbone, LoraOptions
from pathvlm_lightning.callbacks import FormatReward, ReferenceModelCallback, RewardCallback, RolloutCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.stages import Samples
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule
from tests.fit_support import MemoryLogger, make_datamodule, parameters, split_parts, tensorboard_events, trainer_kwargs

G = 4  # completions per prompt; batches hold 2 prompts -> 8 completions


class LengthReward(RewardCallback):
    """A tenth of the completion's character count: differs between random completions."""

    default_name = "length"

    def score_text(self, completion: str, record: VQARecord) -> float:
        return len(completion) / 10


class FirstGroupReward(RewardCallback):
    """0, 1, 2, 3 for the completions of the first prompt of the first batch; 0 everywhere else.

    So batch 0 has one group with spread and one without, and later batches have no spread at all.
    """

    default_name = "first_group"

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def score(self, rollout: Samples) -> torch.Tensor:
        scores = torch.zeros(rollout.num_completions)  # [B*G]
        if self.batches == 0:
            scores[: rollout.group_size] = torch.arange(rollout.group_size, dtype=torch.float32)
        self.batches += 1
        return scores


class ConstantReward(RewardCallback):
    """1 for every completion: every group has zero variance, every advantage is 0."""

    default_name = "constant"

    def score_text(self, completion: str, record: VQARecord) -> float:
        return 1.0


class HalfAbstainingReward(RewardCallback):
    """Abstains (NaN) on every odd completion, scores the length of the even ones."""

    default_name = "half"

    def score(self, rollout: Samples) -> torch.Tensor:
        scores = torch.tensor([len(t) / 10 for t in rollout.completion_texts])  # [B*G]
        scores[1::2] = math.nan
        return scores


class LossCalls(pl.Callback):
    """Records every call of the module's loss: old log-probs given, new log-probs, ratio mean."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.batches = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: GRPOModule) -> None:
        forward = pl_module.loss.forward

        def recording(logprobs, advantages, mask, **kwargs):
            loss, stats = forward(logprobs, advantages, mask, **kwargs)
            old = kwargs.get("old_logprobs")
            self.calls.append(
                dict(old=None if old is None else old.clone(), new=logprobs.detach().clone(), mask=mask.bool(),
                     ratio_mean=float(stats.ratio_mean))
            )
            return loss, stats

        pl_module.loss.forward = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def rollout_callback() -> RolloutCallback:
    return RolloutCallback(num_generations=G, max_new_tokens=8)


def grpo_fit(
    root: Path,
    callbacks: list[pl.Callback],
    *,
    max_steps: int = 2,
    lora: LoraOptions | None = None,
    tensorboard: bool = False,
    trainer_overrides: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> tuple[GRPOModule, pl.Trainer, MemoryLogger, dict[str, torch.Tensor]]:
    """Seeded tiny-model GRPO fit; returns the module, trainer, metric history and initial parameters.
    ``callbacks``: the GRPO parts (given to the module) and any other callbacks (given to the trainer)."""
    pl.seed_everything(0)
    module_kwargs.setdefault("log_completions_every_n_steps", 0)
    if "beta" in module_kwargs:  # the KL coefficient is the loss's
        module_kwargs["loss"] = GRPOLoss(beta=module_kwargs.pop("beta"))
    parts, callbacks = split_parts(callbacks)
    module = GRPOModule(
        Backbone("embedded-tiny", seed=0, lora=lora),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        eval_max_new_tokens=8,
        **parts,
        **module_kwargs,
    )
    before = parameters(module.backbone)
    memory = MemoryLogger()
    loggers = [TensorBoardLogger(save_dir=str(root), name="tb"), memory] if tensorboard else [memory]
    overrides = dict(trainer_overrides or {})
    trainer = pl.Trainer(**trainer_kwargs(root, max_steps=max_steps, logger=loggers, callbacks=callbacks, **overrides))
    trainer.fit(module, datamodule=make_datamodule(root, module.backbone.processor, "prompt"))
    return module, trainer, memory, before


def changed_names(module: GRPOModule, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in parameters(module.backbone).items() if not torch.equal(p, before[n])}


def without_timing(history: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """The history minus wall-clock throughput, the one metric two identical runs may disagree on."""
    return [(step, {k: v for k, v in m.items() if k != "rollout/tokens_per_s"}) for step, m in history]


# ---- full fine-tuning with a frozen reference copy, TensorBoard on -------------------------------
@dataclass
class FullFit:
    root: Path
    module: GRPOModule
    trainer: pl.Trainer
    memory: MemoryLogger
    before: dict[str, torch.Tensor]
    reference: ReferenceModelCallback


@pytest.fixture(scope="module")
def full_fit(tmp_path_factory: pytest.TempPathFactory) -> FullFit:
    root = tmp_path_factory.mktemp("grpo_full")
    reference = ReferenceModelCallback()
    callbacks = [rollout_callback(), LengthReward(), FormatReward(), reference]
    module, trainer, memory, before = grpo_fit(
        root, callbacks, tensorboard=True, beta=0.04, log_completions_every_n_steps=1
    )
    return FullFit(root, module, trainer, memory, before, reference)


def test_fit_changes_the_policy_and_keeps_the_vision_tower_and_reference(full_fit: FullFit) -> None:
    changed = changed_names(full_fit.module, full_fit.before)
    language = {n for n in full_fit.before if n.startswith("model.model.language_model.")}
    visual = {n for n in full_fit.before if n.startswith("model.model.visual.")}
    assert full_fit.trainer.global_step == 2
    assert language and language <= changed
    assert visual and not visual & changed
    # the frozen copy still holds the starting weights
    reference = parameters(full_fit.reference._reference)
    assert reference.keys() == full_fit.before.keys()
    assert all(torch.equal(reference[n], full_fit.before[n]) for n in reference)
    losses = [v for _, v in full_fit.memory.series("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # step 0: policy == reference, so the k3 KL is exactly 0; step 1: the policy has moved
    kl = [v for _, v in full_fit.memory.series("train/kl")]
    assert kl[0] == 0.0 and kl[1] > 0.0


def test_fit_logs_every_documented_metric(full_fit: FullFit) -> None:
    expected = {
        "reward/length",
        "reward/format",
        "reward/total_mean",
        "reward/total_std",
        "advantage/mean",
        "advantage/std",
        "advantage/abs_mean",
        "train/loss",
        "train/kl",
        "train/policy_loss",
        "train/clip_low_frac",
        "train/clip_high_frac",
        "completion/length_mean",
        "completion/length_max",
        "completion/truncated_frac",
        "groups/zero_variance_frac",
        "rollout/tokens_per_s",
        "rollout/sampler_kl",
    }
    keys = full_fit.memory.keys()
    assert expected <= keys, sorted(expected - keys)
    for _, metrics in full_fit.memory.history:
        assert 1 <= metrics["completion/length_max"] <= 8  # max_new_tokens
        assert 0.0 <= metrics["reward/format"] <= 1.0
    events = tensorboard_events(full_fit.root / "tb")
    assert "train/loss" in events.Tags()["scalars"]
    texts = [t for t in events.Tags()["tensors"] if t.startswith("samples/completions")]
    assert texts, events.Tags()["tensors"]
    table = events.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| id | reference | reward | completion |")
    assert table.count("\n| ") == 4  # header rule excluded: the first 4 completions of the step


def test_sampler_and_trainer_agree_in_float32(full_fit: FullFit) -> None:
    # The sampler's recorded log-probs and the trainer's first pass use the same weights: in float32
    # on CPU they differ by rounding only (a cached decode against one full forward).
    kl = [v for _, v in full_fit.memory.series("rollout/sampler_kl")]
    assert len(kl) == 2 and all(0.0 <= v < 1e-6 for v in kl), kl


def test_reward_order_does_not_change_the_run(full_fit: FullFit, tmp_path: Path) -> None:
    reordered = [ReferenceModelCallback(), FormatReward(), LengthReward(), rollout_callback()]
    module, _, memory, _ = grpo_fit(tmp_path, reordered, beta=0.04)
    assert without_timing(memory.history) == without_timing(full_fit.memory.history)
    after, expected = parameters(module.backbone), parameters(full_fit.module.backbone)
    assert all(torch.equal(after[n], expected[n]) for n in expected)


# ---- LoRA: the reference is the base model with adapters off ------------------------------------
def test_lora_reference_is_the_base_model_without_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_copy(self: Backbone) -> Backbone:
        raise AssertionError("a LoRA run must not build a frozen copy of the backbone")

    monkeypatch.setattr(Backbone, "build_frozen_copy", no_copy)
    reference = ReferenceModelCallback()
    callbacks = [rollout_callback(), LengthReward(), reference]
    module, trainer, memory, before = grpo_fit(tmp_path, callbacks, lora=LoraOptions(r=4), beta=0.04)
    assert reference._reference is None and reference.uses_adapters
    changed = changed_names(module, before)
    assert changed and all("lora_" in n for n in changed)  # only adapters train; B moved off zero

    base = Backbone("embedded-tiny", seed=0).eval()  # the same starting weights, no adapters
    module.eval()
    batch = next(iter(trainer.datamodule.train_dataloader()))
    rollout = rollout_callback().generate(module.backbone, batch)
    ref = reference.reference_logprobs(rollout.micro_batches(None))  # [B*G, L]
    expected = base.token_logprobs(rollout.prompt_inputs, rollout.completion_ids, num_generations=G)
    policy = module.backbone.token_logprobs(rollout.prompt_inputs, rollout.completion_ids, num_generations=G)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (policy[mask] - expected[mask]).abs().max() > 1e-4  # the trained adapters do change the policy
    assert [v for _, v in memory.series("train/kl")][1] > 0.0


# ---- beta 0: no reference at all ----------------------------------------------------------------
def test_beta_zero_runs_without_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_copy(self: Backbone, **kwargs: Any) -> Backbone:
        raise AssertionError("beta 0 must not build a frozen copy of the backbone")

    monkeypatch.setattr(Backbone, "build_frozen_copy", no_copy)
    module, trainer, memory, _ = grpo_fit(tmp_path, [rollout_callback(), LengthReward()], beta=0.0)
    assert trainer.global_step == 2
    assert module.reference is None and module.configure_callbacks() == [module.rollout, *module.rewards]
    assert "train/kl" not in memory.keys()


def test_the_parts_are_lightning_callbacks_of_the_fit(full_fit: FullFit) -> None:
    # given to the module, handed to Lightning by configure_callbacks: the trainer runs their hooks
    parts = [full_fit.module.rollout, *full_fit.module.rewards, full_fit.reference]
    assert all(any(part is c for c in full_fit.trainer.callbacks) for part in parts)
    assert [r.name for r in full_fit.module.rewards] == ["format", "length"]  # by name, whatever the list order


# ---- the settings are checked when the module is built, before any step ------------------------
@pytest.mark.parametrize(
    ("callbacks", "beta", "message"),
    [
        ([LengthReward(), ReferenceModelCallback()], 0.04, "rollout must be a RolloutCallback"),
        ([rollout_callback(), ReferenceModelCallback()], 0.04, "rewards must be a non-empty list"),
        ([rollout_callback(), LengthReward()], 0.04, "reference is null"),
        ([rollout_callback(), LengthReward(), LengthReward()], 0.0, r"share the name\(s\) \['length'\]"),
    ],
    ids=["no-rollout", "no-reward", "no-reference", "duplicate-reward"],
)
def test_incomplete_parts_fail_before_the_first_step(
    tmp_path: Path, callbacks: list[pl.Callback], beta: float, message: str
) -> None:
    started = LossCalls()
    with pytest.raises(ValueError, match=message):
        grpo_fit(tmp_path, [*callbacks, started], beta=beta)
    assert started.calls == [] and started.batches == 0


# ---- several optimizer steps per rollout --------------------------------------------------------
def test_num_iterations_reuses_each_rollout_with_old_logprobs(tmp_path: Path) -> None:
    calls = LossCalls()
    _, trainer, memory, _ = grpo_fit(
        tmp_path, [rollout_callback(), LengthReward(), calls], max_steps=4, beta=0.0, num_iterations=2
    )
    assert calls.batches == 2 and trainer.global_step == 4  # 2 optimizer steps per batch
    assert len(calls.calls) == 4
    for first, second in zip(calls.calls[::2], calls.calls[1::2]):
        assert first["old"] is None and first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        # the second pass compares against the first pass's (pre-update) log-probs
        torch.testing.assert_close(second["old"], first["new"])
        mask = second["mask"]
        ratio = torch.exp(second["new"] - second["old"])[mask]
        assert (ratio - 1).abs().max() > 1e-4
        assert second["ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)


# ---- dynamic sampling and abstaining rewards ----------------------------------------------------
def test_drop_zero_variance_groups_trains_on_the_groups_with_spread(tmp_path: Path) -> None:
    module, trainer, memory, _ = grpo_fit(
        tmp_path, [rollout_callback(), FirstGroupReward()], beta=0.0, drop_zero_variance_groups=True
    )
    (step0, step1) = [m for _, m in memory.history]
    # batch 0: group 1 of 2 has rewards 0,1,2,3, group 2 is all 0 -> half the groups are dropped
    assert step0["groups/zero_variance_frac"] == 0.5 and step0["groups/trained_frac"] == 0.5
    assert math.isfinite(step0["train/loss"]) and step0["groups/skipped_steps"] == 0.0
    # batch 1: every reward is 0 -> nothing to learn, the step is skipped (but counted)
    assert step1["groups/zero_variance_frac"] == 1.0 and step1["advantage/abs_mean"] == 0.0
    assert step1["groups/skipped_steps"] == 1.0
    assert trainer.global_step == 2


def test_zero_advantage_steps_leave_weights_and_optimizer_untouched(tmp_path: Path) -> None:
    # Every group uniform at every step: AdamW at lr 1e-3 would still move every weight (it
    # normalises the rounding noise of a zero gradient, and the KL term's, into full-size steps).
    scheduled: list[torch.optim.lr_scheduler.LRScheduler] = []

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        scheduled.append(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10))
        return scheduled[-1]

    reference = ReferenceModelCallback(sync_every_n_steps=1)
    module, trainer, memory, before = grpo_fit(
        tmp_path, [rollout_callback(), ConstantReward(), reference], max_steps=3, beta=0.04, scheduler=scheduler
    )
    after = parameters(module.backbone)
    assert all(torch.equal(after[n], before[n]) for n in before)  # bit-identical
    assert all(torch.equal(p, before[n]) for n, p in parameters(reference._reference).items())
    optimizer = trainer.optimizers[0]
    assert optimizer.state_dict()["state"] == {}  # no moment estimates, no step counts
    assert scheduled[0].last_epoch == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert trainer.global_step == 3  # counted, so max_steps still ends a run that never sees spread
    assert [m["groups/skipped_steps"] for _, m in memory.history] == [1.0, 2.0, 3.0]
    assert all("train/loss" not in m for _, m in memory.history)


def test_abstaining_reward_gives_a_finite_loss(tmp_path: Path) -> None:
    module, _, memory, before = grpo_fit(tmp_path, [rollout_callback(), HalfAbstainingReward()], beta=0.0)
    losses = [v for _, v in memory.series("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(v) for _, v in memory.series("reward/total_mean"))
    assert changed_names(module, before)  # the even completions still teach
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- resume: the reference stays the stage's starting point -------------------------------------
def test_resumed_fit_keeps_the_starting_weights_as_reference(tmp_path: Path) -> None:
    # Lightning restores the checkpoint after the callbacks' setup, where the frozen copy is taken
    # from the module as built (the starting weights), so the reference never becomes the
    # checkpoint's trained policy.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    grpo_fit(tmp_path / "first", [rollout_callback(), LengthReward(), ReferenceModelCallback(), checkpoint],
             beta=0.04, trainer_overrides=dict(enable_checkpointing=True))
    reference = ReferenceModelCallback()
    pl.seed_everything(0)
    module = GRPOModule(
        Backbone("embedded-tiny", seed=0), rollout_callback(), [LengthReward()], reference,
        loss=GRPOLoss(beta=0.04), log_completions_every_n_steps=0,
    )  # fmt: skip
    before = parameters(module.backbone)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resumed", max_steps=3))
    datamodule = make_datamodule(tmp_path / "first", module.backbone.processor, "prompt")
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert trainer.global_step == 3
    assert all(torch.equal(p, before[n]) for n, p in parameters(reference._reference).items())
    assert changed_names(module, before)  # the policy is the resumed (trained) one


def test_zero_advantage_steps_run_when_skipping_is_off(tmp_path: Path) -> None:
    # skip_zero_advantage_steps=False (the benchmarks' setting, so both sides of a comparison do the
    # same work): the same uniform rewards now go through the loss and the optimizer, which moves
    # the weights (AdamW normalises the tiny gradient into a full-size step).
    module, trainer, memory, before = grpo_fit(
        tmp_path, [rollout_callback(), ConstantReward(), ReferenceModelCallback()], max_steps=2, beta=0.04,
        skip_zero_advantage_steps=False,
    )  # fmt: skip
    after = parameters(module.backbone)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert [m["groups/skipped_steps"] for _, m in memory.history] == [0.0, 0.0]
    assert all(math.isfinite(m["train/loss"]) for _, m in memory.history)
