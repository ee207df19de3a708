"""Which trainable weights an optimizer step cannot move because they are stored in half precision.

A weight stored in bfloat16 keeps 8 significant bits: the spacing of representable values around
``w`` is ``2**(floor(log2|w|) - 7)``, and an update smaller than half of it rounds back to ``w``.
Half that spacing is at least ``|w| * 2**-9`` (``2**-11`` for float16's 11 bits), so an update of
size ``lr`` certainly vanishes where ``|w| * 2**-9 > lr``. AdamW's first update is about ``lr`` per
element whatever the gradient's size (``m / sqrt(v)`` is the gradient's sign at step 1), so this
share, computed from the weights alone, is a lower bound on the share of weights the first step
leaves where they were. With N(0, 0.02) weights at lr 1e-6 it is 98 %. Float32 master weights
(FSDP2's ``MixedPrecisionPolicy`` over float32 shards, or one process under ``bf16-mixed``) keep
every update.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: ``2**-(significant bits + 1)``: half a spacing, relative to the weight's magnitude, at its smallest.
HALF_SPACING = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


@dataclass(frozen=True)
class StuckWeights:
    """Trainable half-precision elements, and how many of them an update of ``lr`` cannot move."""

    dtype: torch.dtype
    lr: float
    stuck: int
    total: int  # trainable elements stored in ``dtype``

    @property
    def share(self) -> float:
        return self.stuck / self.total if self.total else 0.0


def stuck_weights(parameters: Iterable[torch.Tensor], lr: float) -> list[StuckWeights]:
    """Per half-precision dtype among ``parameters`` (the trainable ones), the elements with
    ``|w| * HALF_SPACING[dtype] > lr``; float32/float64 parameters are left out (nothing is lost).

    Sharded (DTensor) parameters count their local shard, summed over ranks when a process group
    is running: then it is a collective, and every rank must call it. Replicated (DDP) parameters
    count once per rank, which leaves the share unchanged.
    """
    parameters = list(parameters)
    device = _local(parameters[0]).device if parameters else torch.device("cpu")
    counts = {dtype: torch.zeros(2, dtype=torch.float64, device=device) for dtype in HALF_SPACING}  # [stuck, total]
    for parameter in parameters:
        if parameter.dtype in HALF_SPACING:
            local = _local(parameter).detach()
            stuck = (local.abs().float() * HALF_SPACING[parameter.dtype] > lr).sum()
            counts[parameter.dtype] += torch.stack([stuck.double(), torch.tensor(float(local.numel()), device=device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for pair in counts.values():  # every rank, every dtype, in one order
            dist.all_reduce(pair)
    return [StuckWeights(dtype, lr, int(pair[0]), int(pair[1])) for dtype, pair in counts.items() if pair[1] > 0]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def stuck_weights_message(found: StuckWeights) -> str:
    """The warning for weights that train in half precision."""
    name = str(found.dtype).removeprefix("torch.")
    return (
        f"{found.total:,} trainable weights are stored in {name} and updated in place: at lr {found.lr:g} an "
        f"update (AdamW's first is about lr per weight) is below half a {name} step for at least "
        f"{100 * found.share:.1f} % of them ({found.stuck:,}), so it rounds away and they never move. Keep "
        "float32 weights and compute in bf16 instead: backbone dtype float32 with trainer.precision "
        "bf16-mixed (under FSDP2, bfloat16 gathers of float32 shards), or train LoRA adapters."
    )
