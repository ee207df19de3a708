r"""GSPO: Group Sequence Policy Optimization (Zheng et al., arXiv 2507.18071): one length-normalised
importance ratio per sequence, clipped at the sequence level.

For completion ``i`` of :math:`|y_i|` valid tokens:

.. math::

    s_i = \exp\Big(\frac{1}{|y_i|}\sum_t \log\pi_\theta(y_{i,t}) - \log\pi_{old}(y_{i,t})\Big)

    s_{i,t} = \mathrm{sg}[s_i]\,\frac{\pi_\theta(y_{i,t})}{\mathrm{sg}[\pi_\theta(y_{i,t})]}
    \qquad \text{(the paper's GSPO-token form, eq. 13: equal to } s_i \text{ in value)}

    J = \frac{1}{G}\sum_i \frac{1}{|y_i|}\sum_t
        \min\big(s_{i,t} A_i,\ \mathrm{clip}(s_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\big)

With one advantage per sequence the token form has exactly the gradient of the sequence objective
:math:`\min(s_i A_i, \mathrm{clip}(s_i) A_i)` (:math:`\nabla s_i = s_i \cdot \mathrm{mean}_t
\nabla\log\pi_\theta`), and a clipped sequence gives no gradient to any of its tokens. The
aggregation is fixed to ``grpo`` (mean over each sequence, then over sequences): the paper's
objective is per sequence, and a token sum would weigh each sequence by its length. The k3 KL of
``base.py`` is added per token before that mean. The paper's clip ranges are far narrower than
GRPO's because a sequence ratio stays near 1 (defaults 3e-4 / 4e-4, the paper's section 5.1).

Statistics: ``clip_low_fraction`` / ``clip_high_fraction`` and ``ratio_mean`` are over completions
(:math:`s_i < 1-\epsilon_{low}` with :math:`A<0`, :math:`s_i > 1+\epsilon_{high}` with :math:`A>0`),
not tokens.
"""

from __future__ import annotations

import torch

from pathvlm_lightning.grpo.losses.base import PolicyLoss, PolicyTerms, StepTotals, check_clip, log_ratio


class GSPOLoss(PolicyLoss):
    """Sequence-level clipped ratio (module docstring for the formula and its citation).

    Args:
        epsilon_low: sequence-ratio floor ``1 - epsilon_low``.
        epsilon_high: sequence-ratio ceiling ``1 + epsilon_high``.
        beta: k3 KL coefficient; 0 needs no reference model (the paper trains without KL).
    """

    def __init__(self, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4, beta: float = 0.0) -> None:
        super().__init__(beta=beta, aggregation="grpo")
        check_clip(type(self).__name__, epsilon_low, epsilon_high)
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)

    def objective(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor
    ) -> PolicyTerms:
        lengths = valid.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]
        log_s = (log_ratio(logprobs, old, valid).sum(dim=1, keepdim=True) / lengths).detach()  # [N, 1]
        token_log_s = log_s + (logprobs - logprobs.detach())  # [N, L]: sg[s_i] pi / sg[pi], log space
        ratio = torch.exp(torch.where(valid, token_log_s, log_s))  # [N, L], s_i in value
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)  # [N, L]
        surrogate = torch.minimum(ratio * adv, clipped * adv)  # [N, L]
        s = torch.exp(log_s)  # [N, 1]
        return PolicyTerms(
            objective=surrogate,
            ratio=s,
            clipped_low=(s < 1 - self.epsilon_low) & (adv < 0),
            clipped_high=(s > 1 + self.epsilon_high) & (adv > 0),
        )

    def _ratio_stats(self, terms: PolicyTerms, mask: torch.Tensor, totals: StepTotals) -> dict[str, torch.Tensor]:
        completions = max(totals.completions, 1)
        return dict(
            clip_low_fraction=terms.clipped_low.to(mask.dtype).sum() / completions,
            clip_high_fraction=terms.clipped_high.to(mask.dtype).sum() / completions,
            ratio_mean=terms.ratio.sum() / completions,
        )
