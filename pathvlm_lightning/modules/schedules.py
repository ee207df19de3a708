"""Learning-rate schedules that LightningCLI can build from YAML (``scheduler: class_path: ...``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio * lr`` at ``total_steps``.

    Stepped once per optimizer step (the modules return it with ``interval: step``).
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"WarmupCosineLR: total_steps must be positive, got {total_steps!r}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosineLR: warmup_steps must be in [0, total_steps], got {warmup_steps!r}")
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
