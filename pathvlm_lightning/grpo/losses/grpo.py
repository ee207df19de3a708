r"""GRPO: the clipped token-ratio surrogate (PPO's clip, arXiv 1707.06347, as used by DeepSeekMath's
GRPO, arXiv 2402.03300, and DAPO's clip-higher, arXiv 2503.14476).

For token ``t`` of completion ``i`` (advantage :math:`A_i`):

.. math::

    \rho_{i,t} = \exp(\log\pi_\theta - \log\pi_{old}), \qquad
    s_{i,t} = \min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\big)

then the k3 KL and the aggregation of ``base.py``. A token is clipped (no gradient) when
:math:`\rho < 1-\epsilon_{low}` with :math:`A < 0` (``clip_low_fraction``) or
:math:`\rho > 1+\epsilon_{high}` with :math:`A > 0` (``clip_high_fraction``).
"""

from __future__ import annotations

import torch

from pathvlm_lightning.grpo.losses.base import Aggregation, PolicyLoss, PolicyTerms, check_clip, log_ratio


class GRPOLoss(PolicyLoss):
    """Clipped token-ratio surrogate minus ``beta`` x k3 KL (module docstring for the formula).

    Args:
        aggregation: ``grpo`` (sequence mean, then mean), ``bnpo``, ``dr_grpo`` or ``dapo``
            (``losses/base.py``); ``dapo`` with ``epsilon_high: 0.28`` is DAPO's loss.
        epsilon_low: lower clip range, ratio floor ``1 - epsilon_low``.
        epsilon_high: upper clip range, ratio ceiling ``1 + epsilon_high`` (DAPO's clip-higher
            uses 0.28 to leave room for rare tokens to grow).
        beta: k3 KL coefficient; 0 needs no reference model.
    """

    def __init__(
        self,
        aggregation: Aggregation = "grpo",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.04,
    ) -> None:
        super().__init__(beta=beta, aggregation=aggregation)
        check_clip(type(self).__name__, epsilon_low, epsilon_high)
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)

    def objective(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor
    ) -> PolicyTerms:
        ratio = torch.exp(log_ratio(logprobs, old, valid))  # [N, L]
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)  # [N, L]
        surrogate = torch.minimum(ratio * adv, clipped * adv)  # [N, L]
        return PolicyTerms(
            objective=surrogate,
            ratio=ratio.detach(),
            clipped_low=(ratio < 1 - self.epsilon_low) & (adv < 0),
            clipped_high=(ratio > 1 + self.epsilon_high) & (adv > 0),
        )
