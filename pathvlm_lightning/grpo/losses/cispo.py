r"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, section 3.1).

Instead of clipping the update (PPO/GRPO, where a clipped token gets no gradient), CISPO clips the
importance-sampling weight and stops its gradient, so every token keeps a REINFORCE gradient:

.. math::

    \hat r_{i,t} = \mathrm{clip}(\rho_{i,t},\ 1-\epsilon^{IS}_{low},\ 1+\epsilon^{IS}_{high}), \qquad
    s_{i,t} = \mathrm{sg}[\hat r_{i,t}]\, A_i \log\pi_\theta(y_{i,t})

    J = \frac{1}{\sum_i |y_i|}\sum_i\sum_t s_{i,t}

so :math:`\nabla J = \frac{1}{\sum|y_i|}\sum \hat r_{i,t} A_i \nabla\log\pi_\theta`. The paper sets
no lower bound in practice (``epsilon_low: null``) and tunes only the ceiling; the default ceiling
``1 + 4.0 = 5`` is ScaleRL's recommended :math:`\epsilon_{max}` (arXiv 2510.13786). The paper's
normaliser is the token count of the whole batch: ``aggregation: dapo`` (the default; the module
passes the global count). ``clip_high_fraction`` counts tokens whose weight was capped
(:math:`\rho > 1+\epsilon_{high}`, whatever the sign of :math:`A`: the cap changes both), and
``clip_low_fraction`` those raised to the floor. The loss *value* is
:math:`-\sum \hat r A \log\pi / \ldots`, meaningful only through its gradient.
"""

from __future__ import annotations

import torch

from pathvlm_lightning.grpo.losses.base import Aggregation, PolicyLoss, PolicyTerms, check_clip, log_ratio


class CISPOLoss(PolicyLoss):
    """Clipped, stop-gradient IS weight times the log-prob (module docstring for the formula).

    Args:
        epsilon_low: weight floor ``1 - epsilon_low``; null (the paper's choice): no floor.
        epsilon_high: weight ceiling ``1 + epsilon_high``. TRL's ``epsilon_high`` for cispo is the
            ceiling itself (5.0 there is 4.0 here).
        aggregation: ``dapo`` (the paper's token mean over the global batch) or another of
            ``losses/base.py``.
        beta: k3 KL coefficient; 0 needs no reference model.
    """

    def __init__(
        self,
        epsilon_low: float | None = None,
        epsilon_high: float = 4.0,
        aggregation: Aggregation = "dapo",
        beta: float = 0.0,
    ) -> None:
        super().__init__(beta=beta, aggregation=aggregation)
        check_clip(type(self).__name__, epsilon_low, epsilon_high)
        self.epsilon_low = None if epsilon_low is None else float(epsilon_low)
        self.epsilon_high = float(epsilon_high)

    def objective(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor
    ) -> PolicyTerms:
        ratio = torch.exp(log_ratio(logprobs, old, valid)).detach()  # [N, L]
        floor = None if self.epsilon_low is None else 1 - self.epsilon_low
        weight = torch.clamp(ratio, min=floor, max=1 + self.epsilon_high)  # [N, L], no gradient
        # Padding may hold any log-prob; 0 there keeps an -inf from becoming NaN under the mask.
        logp = torch.where(valid, logprobs, 0.0)  # [N, L]
        low = torch.zeros_like(valid) if floor is None else ratio < floor
        return PolicyTerms(
            objective=weight * adv * logp,
            ratio=ratio,
            clipped_low=low,
            clipped_high=ratio > 1 + self.epsilon_high,
        )
