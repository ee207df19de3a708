r"""SAPO: Soft Adaptive Policy Optimization (Gao et al., Qwen, arXiv 2511.20347).

A smooth, temperature-controlled gate replaces the hard clip: near on-policy tokens keep the full
gradient, and the gradient fades smoothly as the token ratio leaves 1, faster for negative
advantages:

.. math::

    f_{i,t}(\rho) = \frac{4}{\tau_{i,t}}\,\sigma\big(\tau_{i,t}(\rho - 1)\big), \qquad
    \tau_{i,t} = \begin{cases}\tau_{pos} & A_i > 0\\ \tau_{neg} & \text{otherwise}\end{cases}

    J = \frac{1}{G}\sum_i \frac{1}{|y_i|}\sum_t f_{i,t}(\rho_{i,t})\,A_i

Its gradient is :math:`w_{i,t} A_i \nabla\log\pi_\theta` with
:math:`w = 4\,p(1-p)\,\rho`, :math:`p = \sigma(\tau(\rho-1))`: exactly 1 on-policy (:math:`\rho=1`),
so the first pass over a rollout has GRPO's gradient, whatever :math:`\tau`. The paper's defaults
are :math:`\tau_{pos}=1.0`, :math:`\tau_{neg}=1.05`.

Aggregation: ``grpo`` by default, the paper's objective (mean over each sequence, then over the
group); TRL 1.16 aggregates ``sapo`` the same way, while verl-style implementations (Trinity-RFT,
AReaL) default to a token mean (``bnpo``/``dapo`` here). There is no hard clip, so both clip
fractions are always 0.
"""

from __future__ import annotations

import torch

from pathvlm_lightning.grpo.losses.base import Aggregation, PolicyLoss, PolicyTerms, log_ratio


class SAPOLoss(PolicyLoss):
    """Soft sigmoid gate on the token ratio, asymmetric in the advantage's sign (module docstring).

    Args:
        tau_pos: gate temperature for positive advantages.
        tau_neg: gate temperature for zero or negative advantages (larger: their gradient fades
            faster; the paper keeps ``tau_neg > tau_pos``).
        aggregation: ``grpo`` (the paper's) or another of ``losses/base.py``.
        beta: k3 KL coefficient; 0 needs no reference model.
    """

    def __init__(
        self, tau_pos: float = 1.0, tau_neg: float = 1.05, aggregation: Aggregation = "grpo", beta: float = 0.0
    ) -> None:
        super().__init__(beta=beta, aggregation=aggregation)
        for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
            if not 0 < tau < float("inf"):
                raise ValueError(f"SAPOLoss: {name} must be a finite number > 0, got {tau!r}")
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)

    def objective(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor
    ) -> PolicyTerms:
        ratio = torch.exp(log_ratio(logprobs, old, valid))  # [N, L]
        # In the log-probs' dtype: torch.where of two Python floats would give float32 (1.05 inexact).
        tau = torch.where(adv > 0, adv.new_tensor(self.tau_pos), adv.new_tensor(self.tau_neg))  # [N, 1]
        gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau  # [N, L]
        never = torch.zeros_like(valid)
        return PolicyTerms(objective=gate * adv, ratio=ratio.detach(), clipped_low=never, clipped_high=never)
