"""Supervised fine-tuning on chain-of-thought targets (the paper's knowledge-injection stage)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.modules.base import BackboneModule
from pathvlm_lightning.modules.evaluation import GenerationEvaluation

_MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")


class SFTModule(GenerationEvaluation, BackboneModule):
    """Next-token loss on the assistant reply ``<think>...</think><answer>X) ...</answer>``.

    Labels come masked from the collator (prompt and padding are -100), so the loss covers only the
    reply. The training loss is the mean over every label token of the global batch: each rank sums
    its token losses and divides by the label tokens of all ranks / world size (one all-reduce), so
    after DDP/FSDP average the ranks' gradients every token weighs the same, as on one process
    (a rank-local mean would weigh the tokens of a rank with shorter replies more). With
    ``accumulate_grad_batches`` the normaliser is still per micro-batch. ``test``/``predict``
    answer with greedy decoding (see ``modules/evaluation.py``).

    Args:
        backbone: the Qwen2.5-VL wrapper.
        optimizer: optimizer factory (LightningCLI ``optimizer:`` group).
        scheduler: optional LR scheduler factory, stepped every optimizer step.
        eval_max_new_tokens: generation budget for ``test``/``predict``.
        predictions_path: where ``test`` writes predictions JSONL (default: the log dir).
    """

    batch_kind = "sft"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        eval_max_new_tokens: int = 128,
        predictions_path: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self._init_evaluation(eval_max_new_tokens, predictions_path)
        self._last_batch_end: float | None = None

    def _loss(self, batch: dict, num_label_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token-mean loss; with ``num_label_tokens``, the token-loss sum divided by it instead
        (transformers' ``num_items_in_batch``)."""
        inputs = {k: batch[k] for k in _MODEL_KEYS if k in batch}
        if num_label_tokens is not None:
            inputs["num_items_in_batch"] = num_label_tokens
        return self.backbone(**inputs).loss

    def _global_label_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Label tokens [] of this step on all ranks / world size (a collective)."""
        local = (labels[:, 1:] != -100).sum()  # predicted tokens
        return self.global_count_per_rank(local).float().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self._global_label_tokens(batch["labels"]))
        n = len(batch["records"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = float(batch["attention_mask"].sum())
            self.log("train/tokens_per_s", tokens / max(now - self._last_batch_end, 1e-9))
        self._last_batch_end = now

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["records"]))
