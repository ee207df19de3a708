"""Group Relative Policy Optimization: the RL stage (critic-free, advantages relative to the group)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger

from pathvlm_lightning.backbone import SHARING_MODE_CODES, Backbone
from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback
from pathvlm_lightning.grpo.advantages import finite_std, global_finite_std, group_advantages, zero_variance_groups
from pathvlm_lightning.grpo.losses import GRPOLoss, LossStats, PolicyLoss, StepTotals, sum_stats
from pathvlm_lightning.grpo.stages import MicroBatch, Samples, Scored, sampler_kl_terms, total_reward
from pathvlm_lightning.modules.base import BackboneModule
from pathvlm_lightning.modules.evaluation import GenerationEvaluation
from pathvlm_lightning.modules.grpo_settings import check_grpo_settings


class GRPOModule(GenerationEvaluation, BackboneModule):
    """One training step = one rollout and ``num_iterations`` optimizer steps on it.

    The module is given its parts (``rollout``, ``rewards``, ``reference``, ``loss``) and hands the
    three callbacks among them to Lightning with :meth:`configure_callbacks`, so they keep their
    ``setup``, hooks and checkpointed state. The step calls them itself, in a fixed order:
    ``rollout.generate`` (B*G completions) -> every reward's ``begin`` -> the reference forward (only
    when the loss's ``beta > 0``; a judge's network wait overlaps it) -> every reward's ``score``
    (rewards in the order of their names) -> group-relative advantages -> the ``loss``
    (``grpo/losses/``: GRPO/DAPO, GSPO, CISPO, SAPO, each with the k3 KL). Settings flow one way: the
    module reads the rollout's G and ``max_new_tokens`` from the object it was given, binds the loss
    to that length and binds the reference to the policy and ``micro_batch_size``; no part looks the
    module up. Every cross-check of the arguments is ``modules/grpo_settings.py``.
    Optimisation is manual because one rollout feeds ``num_iterations`` optimizer steps; with 1 the
    old log-probs are the detached current ones and no extra forward is spent, with more the first
    pass's detached log-probs serve as the old policy's.

    The step's data moves through frozen stages (``grpo/stages.py``): ``Samples`` (each completion
    parsed once) -> ``MicroBatch`` slices -> ``Scored``. With ``micro_batch_size`` the policy and
    reference passes run over the same slices of whole groups, cut once per step (a group's prompt
    stays in one pass; with ``drop_zero_variance_groups`` the kept groups are cut again for the
    policy), and gradients accumulate over the slices before the one optimizer step; every loss
    normaliser (completions, tokens, dapo's global count) is counted over the whole step, so loss,
    statistics and gradient equal the full batch's (``grpo/losses/base.py``).

    A step where every group of every rank has zero-variance rewards (all advantages 0) teaches
    nothing: it is skipped (no forward/backward, no scheduler step, weights and optimizer state
    untouched), because AdamW would normalise the rounding noise (and the KL term's tiny gradient
    near the reference) into a full-size update. It still counts as a ``global_step`` (the
    optimizer is stepped with every gradient set to None, which torch's optimizers skip), so
    ``max_steps`` bounds the rollouts and a run whose rewards never spread still ends.
    ``groups/skipped_steps`` counts them over the run.

    ``rollout/sampler_kl`` is the agreement of sampler and trainer: the mean over completion tokens of
    the k3 estimate of KL(sampler || trainer) between the log-probs the sampler recorded while drawing
    each token and the first iteration's policy log-probs, computed with the same weights before the
    optimizer step (``grpo.stages.sampler_kl_terms``). ~0 in float32; in bf16 on GPU it measures how
    far the rollout is off-policy by numerics alone. Train-mode dropout (e.g. LoRA dropout) in the
    trainer's pass counts too. Not logged on skipped steps (no forward is run).

    Args:
        backbone: the policy (starts from the SFT stage's exported folder).
        rollout: the sampler (``RolloutCallback``): G completions per prompt, their budget and temperature.
        rewards: the reward callbacks, summed with their weights (``FormatReward``, ``AccuracyReward``,
            ``ProcessReward``, a user reward from the root ``callbacks/`` package, ...); names must differ.
        reference: the KL anchor (``ReferenceModelCallback``), or null. Required when the loss's
            ``beta > 0``, and refused when ``beta == 0`` (no reference log-probs are computed then, and
            a reference given anyway would build a frozen copy for nothing).
        loss: the policy loss, by ``class_path`` in YAML (``pathvlm_lightning.grpo.losses.GRPOLoss``,
            ``GSPOLoss``, ``CISPOLoss``, ``SAPOLoss``); default ``GRPOLoss()``. The module binds its
            ``max_completion_length`` to the rollout's ``max_new_tokens`` (dr_grpo's normaliser) and
            passes the dapo aggregation's global token count over all data-parallel ranks.
        optimizer / scheduler: injected factories; the scheduler steps once per optimizer step.
        scale_rewards: advantage scaling, ``group`` (std of the group), ``batch`` (std of the global
            batch, every data-parallel rank's rewards) or ``none``.
        num_iterations: optimizer steps per rollout (PPO-style reuse).
        drop_zero_variance_groups: train only on groups whose rewards differ (dynamic sampling);
            their advantages are 0 anyway, dropping them stops them diluting the loss.
        max_grad_norm: gradient clipping by global norm (null: none).
        micro_batch_size: completions per policy/reference forward-backward (a multiple of the
            rollout's G, so whole groups); null: the whole rollout in one pass.
        skip_zero_advantage_steps: skip steps with nothing to learn (above); ``false`` runs them like
            any other step (the benchmarks do, so both sides of a comparison do the same work).
        log_completions_every_n_steps: write a few sample completions to TensorBoard as text.
        eval_max_new_tokens / predictions_path: greedy ``test``/``predict``/``validate``.
    """

    batch_kind = "prompt"

    def __init__(
        self,
        backbone: Backbone,
        rollout: RolloutCallback,
        rewards: list[RewardCallback],
        reference: ReferenceModelCallback | None = None,
        loss: PolicyLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        num_iterations: int = 1,
        drop_zero_variance_groups: bool = False,
        max_grad_norm: float | None = 1.0,
        micro_batch_size: int | None = None,
        skip_zero_advantage_steps: bool = True,
        log_completions_every_n_steps: int = 50,
        eval_max_new_tokens: int = 128,
        predictions_path: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler)
        loss = GRPOLoss() if loss is None else loss
        check_grpo_settings(
            backbone=backbone, rollout=rollout, rewards=rewards, reference=reference, loss=loss,
            scale_rewards=scale_rewards, num_iterations=num_iterations, max_grad_norm=max_grad_norm,
            micro_batch_size=micro_batch_size,
        )  # fmt: skip
        parts = ["backbone", "optimizer", "scheduler", "rollout", "rewards", "reference", "loss"]
        self.save_hyperparameters(ignore=parts)
        self.automatic_optimization = False
        self._init_evaluation(eval_max_new_tokens, predictions_path)
        # The parts, and settings handed to them: nothing flows back from a part to the module.
        self.rollout = rollout
        self.rewards = tuple(sorted(rewards, key=lambda r: r.name))  # a fixed order whatever the list order
        self.reference = reference
        self.loss = loss.bind(max_completion_length=rollout.max_new_tokens)
        if reference is not None:
            reference.bind(policy=backbone)
        # hparams.yaml and the checkpoint name the whole objective, as a config writes it
        self.save_hyperparameters({
            "rollout": rollout.config(),
            "rewards": [r.config() for r in rewards],
            "reference": None if reference is None else reference.config(),
            "loss": self.loss.config(),
        })  # fmt: skip
        self._skipped_steps = 0
        self._sharing_mode_said: str | None = None  # the mode last written to TensorBoard's hparams/text

    @property
    def micro_batch_size(self) -> int | None:
        """Completions per log-prob pass."""
        return self.hparams.micro_batch_size

    def configure_callbacks(self) -> list[Callback]:
        """The parts that are Lightning callbacks (rollout, rewards, reference): Lightning calls their
        hooks and checkpoints their state under their ``state_key``, as when they were listed in
        ``trainer.callbacks``, so checkpoints written then resume now."""
        return [self.rollout, *self.rewards, *([] if self.reference is None else [self.reference])]

    # ---- the step -------------------------------------------------------------------------------
    def make_rollout(self, batch: dict) -> tuple[Scored, tuple[MicroBatch, ...]]:
        """One batch through the stages (``grpo/stages.py``): sampled, parsed once, cut once into
        the micro-batch slices the reference and the policy share, scored, with advantages."""
        samples = self.rollout.generate(self.backbone, batch)  # Samples: B*G completions, each parsed once
        for reward in self.rewards:
            reward.begin(samples)
        slices = samples.micro_batches(self.micro_batch_size)  # cut once per step
        reference = self.reference
        ref_logprobs = None if reference is None else reference.reference_logprobs(slices)  # [B*G, L]
        scores = {reward.name: reward.checked_score(samples).to(self.device) for reward in self.rewards}
        rewards = {reward.name: scores[reward.name] * reward.weight for reward in self.rewards}  # [B*G] each
        total = total_reward(rewards)  # [B*G]
        scale = self.hparams.scale_rewards
        batch_std = global_finite_std(total, self.trainer.strategy.reduce) if scale == "batch" else None
        scored = Scored(
            samples=samples,
            scores=scores,
            rewards=rewards,
            total=total,
            advantages=group_advantages(total, samples.group_size, scale=scale, batch_std=batch_std),
            ref_logprobs=ref_logprobs,
        )
        return scored, slices

    def training_step(self, batch: dict, batch_idx: int) -> None:
        scored, slices = self.make_rollout(batch)
        zero_var = zero_variance_groups(scored.total, scored.samples.group_size)  # [B]
        trained, parts = scored, slices
        if self.hparams.drop_zero_variance_groups and bool((~zero_var).any()) and not bool((~zero_var).all()):
            trained = scored.select_groups(~zero_var)  # the kept groups, re-cut into slices
            parts = trained.samples.micro_batches(self.micro_batch_size)
        skip = self._nothing_to_learn(zero_var)
        self._skipped_steps += int(skip)
        self._log_rollout(scored, zero_var, trained)
        optimizer = self.optimizers()
        if skip:
            for _ in range(self.hparams.num_iterations):  # the step counter moves, nothing else
                optimizer.zero_grad(set_to_none=True)
                optimizer.step()
            return

        scheduler = self.lr_schedulers()
        mask = trained.samples.completion_mask  # [N, L]
        global_count = self.loss.needs_global_token_count  # dapo: valid tokens of all ranks / world size
        num_tokens = float(self.global_count_per_rank(mask.sum())) if global_count else None
        totals = StepTotals.of(mask)  # the whole step's normalisers
        old_logprobs: list[torch.Tensor | None] = [None] * len(parts)  # per slice, from the first iteration
        agreement: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k3 sum, tokens) per micro-batch
        for iteration in range(self.hparams.num_iterations):
            optimizer.zero_grad()
            losses, stats = [], []
            with self.backbone.output_layer_gathered():  # FSDP2: one root gather for all slices
                for index, part in enumerate(parts):
                    last = index == len(parts) - 1  # DDP all-reduces the summed gradients once, after it
                    with nullcontext() if last else self._no_gradient_sync():
                        loss, part_stats, logprobs = self._accumulate(
                            part, trained, old_logprobs[index], num_tokens, totals
                        )
                    losses.append(loss)
                    stats.append(part_stats)
                    if iteration == 0 and self.hparams.num_iterations > 1:
                        old_logprobs[index] = logprobs
                    if iteration == 0 and part.sampler_logprobs is not None:  # the weights that sampled
                        agreement.append(sampler_kl_terms(part.sampler_logprobs, logprobs, part.completion_mask))
            if self.hparams.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.parameters() if p.requires_grad], self.hparams.max_grad_norm
                )
                self.log("train/grad_norm", _full(grad_norm), batch_size=1)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self._log_loss(sum(losses), sum_stats(stats))
            if iteration == 0 and agreement:
                kl_sum, tokens = (sum(t) for t in zip(*agreement))
                self.log("rollout/sampler_kl", kl_sum / tokens.clamp(min=1), batch_size=1, sync_dist=True)

    def _accumulate(
        self,
        part: MicroBatch,
        scored: Scored,
        old_logprobs: torch.Tensor | None,
        num_tokens: float | None,
        totals: StepTotals,
    ) -> tuple[torch.Tensor, LossStats, torch.Tensor]:
        """Forward-backward of one slice of whole groups (its rows of ``scored``): (its detached loss
        share, stats share, detached log-probs [n, L])."""
        logprobs = self.backbone.token_logprobs(
            part.prompt_inputs,
            part.completion_ids,
            num_generations=part.group_size,
            temperature=part.temperature,
            completion_mask=part.completion_mask,
        )  # [n, L]
        ref_logprobs = None if scored.ref_logprobs is None else scored.ref_logprobs[part.rows]  # [n, L]
        loss, stats = self.loss(
            logprobs,
            scored.advantages[part.rows],
            part.completion_mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            num_tokens=num_tokens,
            totals=totals,
        )
        self.manual_backward(loss)
        return loss.detach(), stats, logprobs.detach()

    def _no_gradient_sync(self) -> AbstractContextManager[Any]:
        """DDP: accumulate this micro-batch's gradients locally (``no_sync``). FSDP2 keeps reducing
        each micro-batch: its gradients are sharded, and skipping the reduce-scatter would hold
        them unsharded until the last one."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _nothing_to_learn(self, zero_var: torch.Tensor) -> bool:
        """True when every group on every rank has zero-variance rewards (a collective: all ranks
        decide the same, so they skip the step together and no gradient reduction is left waiting)."""
        if not self.hparams.skip_zero_advantage_steps:
            return False
        return self.trainer.strategy.reduce_boolean_decision(bool(zero_var.all()), all=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["grpo_skipped_steps"] = self._skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._skipped_steps = int(checkpoint.get("grpo_skipped_steps", 0))

    # ---- logging --------------------------------------------------------------------------------
    def _log_rollout(self, scored: Scored, zero_var: torch.Tensor, trained: Scored) -> None:
        rollout, total = scored.samples, scored.total
        lengths = rollout.completion_mask.sum(dim=1).float()  # [B*G]
        log = dict(batch_size=rollout.num_completions, sync_dist=True)
        for name, scores in scored.scores.items():
            self.log(f"reward/{name}", torch.nanmean(scores), prog_bar=name == "accuracy", **log)
        self.log("reward/total_mean", torch.nanmean(total), prog_bar=True, **log)
        self.log("reward/total_std", finite_std(total), **log)
        adv = scored.advantages
        self.log("advantage/mean", adv.mean(), **log)
        self.log("advantage/std", adv.std() if adv.numel() > 1 else adv.new_zeros(()), **log)
        self.log("advantage/abs_mean", adv.abs().mean(), **log)
        self.log("completion/length_mean", lengths.mean(), **log)
        self.log("completion/length_max", lengths.max(), reduce_fx="max", **log)
        self.log("completion/truncated_frac", rollout.truncated.float().mean(), **log)
        self.log("groups/zero_variance_frac", zero_var.float().mean(), **log)
        self.log("groups/trained_frac", trained.samples.num_prompts / rollout.num_prompts, **log)
        self.log("groups/skipped_steps", float(self._skipped_steps), reduce_fx="max", **log)
        self.log("rollout/tokens_per_s", lengths.sum() / max(rollout.generation_seconds, 1e-9), **log)
        for reward in self.rewards:
            for key, value in reward.metrics().items():
                reduce_fx = "sum" if key in reward.summed_metrics else "max" if key.endswith("_max") else "mean"
                self.log(f"{reward.name}/{key}", float(value), reduce_fx=reduce_fx, **log)
        every = self.hparams.log_completions_every_n_steps
        if every and self.global_step % every == 0 and isinstance(self.logger, TensorBoardLogger):
            self._log_samples(rollout, total)

    def _log_loss(self, loss: torch.Tensor, stats: Any) -> None:
        log = dict(batch_size=1, sync_dist=True)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        self.log("train/policy_loss", stats.policy_loss, **log)
        if stats.kl is not None:
            self.log("train/kl", stats.kl, prog_bar=True, **log)
        self.log("train/clip_low_frac", stats.clip_low_fraction, **log)
        self.log("train/clip_high_frac", stats.clip_high_fraction, **log)
        self.log("train/ratio_mean", stats.ratio_mean, **log)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], **log)
        self._log_sharing_mode()

    def _log_sharing_mode(self) -> None:
        """``rollout/sharing_mode``: the policy pass's way of sharing prompts as a number (lowest over
        ranks; ``SHARING_MODE_CODES``: 0 none, 1 images, 2 grouped, 3 cache); its name once in TensorBoard."""
        mode = self.backbone.last_sharing_mode
        if mode is None:
            return
        self.log("rollout/sharing_mode", float(SHARING_MODE_CODES[mode]), reduce_fx="min", batch_size=1, sync_dist=True)
        if mode != self._sharing_mode_said and isinstance(self.logger, TensorBoardLogger):
            self._sharing_mode_said = mode
            codes = ", ".join(f"{code} {name}" for name, code in SHARING_MODE_CODES.items())
            self.logger.log_hyperparams({"sharing_mode": mode})
            self.logger.experiment.add_text("rollout/sharing_mode", f"{mode} ({codes})", global_step=self.global_step)

    def _log_samples(self, rollout: Samples, total: torch.Tensor, count: int = 4) -> None:
        rows = []
        for i in range(min(count, rollout.num_completions)):
            record = rollout.record_of(i)
            text = rollout.completion_texts[i].replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {record.id} | {record.reference} | {total[i].item():.2f} | `{text}` |")
        table = "| id | reference | reward | completion |\n|---|---|---|---|\n" + "\n".join(rows)
        self.logger.experiment.add_text("samples/completions", table, global_step=self.global_step)

    # ---- validation: greedy answers on the validation split ----------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_correct: list[float] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds = self.answer_batch(batch)
        n = len(preds)
        self.log("val/accuracy", sum(p.correct for p in preds) / n, batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/format_compliance", sum(p.format_ok for p in preds) / n, batch_size=n, sync_dist=True)
        self.log("val/avg_output_tokens", sum(p.output_tokens for p in preds) / n, batch_size=n, sync_dist=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly DTensor) value, for logging."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
