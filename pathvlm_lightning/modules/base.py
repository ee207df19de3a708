"""What the SFT and GRPO modules share: the backbone, the injected optimizer/scheduler, sharding."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.precision import stuck_weights, stuck_weights_message
from pathvlm_lightning.backbone.sharding import mixed_precision_policy

_log = logging.getLogger(__name__)


class BackboneModule(pl.LightningModule):
    """A LightningModule around a :class:`Backbone`.

    The optimizer and scheduler are injected by LightningCLI (``optimizer:``/``scheduler:`` in YAML,
    or callables in Python); only parameters with ``requires_grad`` are optimised, so a frozen vision
    tower or a LoRA-wrapped LM is handled by the backbone's own settings.
    """

    #: what train/val batches must hold: "sft" (conversation + labels) or "prompt" (prompts only)
    batch_kind = "sft"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` shard the backbone with FSDP2 (``fully_shard``), once, with
        the trainer's precision as FSDP2's mixed-precision policy (``bf16-mixed``: bfloat16 gathers,
        float32 gradient reduction; ``sharding.mixed_precision_policy``)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy) and not getattr(self, "_sharded", False):
            policy = mixed_precision_policy(self._trainer.precision)
            self.backbone.apply_fully_shard(self.device_mesh["data_parallel"], policy)
            self._sharded = True

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: the backbone has no trainable parameters")
        optimizer = self._optimizer_factory(params)
        self._warn_about_half_precision_updates(optimizer)
        if self._scheduler_factory is None:
            return optimizer
        scheduler = self._scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_count_per_rank(self, local: torch.Tensor) -> torch.Tensor:
        """The loss normaliser for a count summed over the global batch: [] float64, this step's
        ``local`` count (tokens) summed over every data-parallel rank, divided by the world size
        (a collective). Data-parallel gradients are averaged over ranks, so dividing each rank's
        sum by it makes the step's gradient the mean over every token of the global batch, as on
        one process (GRPO's dapo aggregation, SFT's label tokens)."""
        local = local.to(device=self.device, dtype=torch.float32)
        return self.trainer.strategy.reduce(local, reduce_op="sum").double() / self.trainer.world_size

    def _warn_about_half_precision_updates(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn once per fit, on rank 0, when the optimizer updates bfloat16/float16 weights in place
        (``bf16-true``/``16-true``, or a half-precision backbone ``dtype``): name the share of them an
        update at the configured lr cannot move (``backbone/precision.py``). A collective under a
        process group; the float32 master weights of ``bf16-mixed`` never warn."""
        for group in optimizer.param_groups:
            for found in stuck_weights(group["params"], float(group["lr"])):
                if self._trainer is None or self._trainer.is_global_zero:
                    _log.warning("%s: %s", type(self).__name__, stuck_weights_message(found))
