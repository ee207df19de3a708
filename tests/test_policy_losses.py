"""GSPO, CISPO and SAPO (``grpo/losses/``) on a 2-group example worked out by hand, the KL term they
share, and micro-batch shares that add up to the whole step for every loss class.

The example: 2 groups of 2 completions (N = 4), L = 3, padded rows; completions 0 and 1 form group 1,
2 and 3 group 2. Log-ratios (log pi - log pi_old) per token, "-" for padding:

    completion  A      log-ratios            valid tokens
    0           +1     [0.2, 0.0, -]         2
    1           -1     [-0.6, -0.3, 0.0]     3
    2           +1     [0.3, 0.5, 0.4]       3
    3           -1     [0.1, -, -]           1

Old log-probs are -1 everywhere, so log pi = -1 + log-ratio. Padding holds arbitrary values (-50),
which must change nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from pathvlm_lightning.grpo.losses import CISPOLoss, GRPOLoss, GSPOLoss, SAPOLoss, StepTotals, sum_stats

LOG_RATIOS = [[0.2, 0.0, -50.0], [-0.6, -0.3, 0.0], [0.3, 0.5, 0.4], [0.1, -50.0, -50.0]]
MASK = [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0]


def example(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.full((4, 3), -1.0, dtype=dtype)
    logprobs = (old + torch.tensor(LOG_RATIOS, dtype=dtype)).requires_grad_()
    return logprobs, old, torch.tensor(ADVANTAGES, dtype=dtype), torch.tensor(MASK)


def loss_and_grad(loss_fn, **kwargs):
    logprobs, old, advantages, mask = example()
    loss, stats = loss_fn(logprobs, advantages, mask, old_logprobs=old, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss, stats, grad


def test_gspo_by_hand():
    # Sequence ratios s_i = exp(mean of the valid log-ratios), clip range [0.8, 1.2]:
    #   s0 = e^0.1 = 1.105171   inside                 -> min(s A, clip(s) A) =  1.105171
    #   s1 = e^-0.3 = 0.740818  < 0.8 with A < 0: low  -> min(-0.740818, -0.8) = -0.8 (no gradient)
    #   s2 = e^0.4 = 1.491825   > 1.2 with A > 0: high -> min(1.491825, 1.2)   =  1.2 (no gradient)
    #   s3 = e^0.1 = 1.105171   inside (A < 0)         -> -1.105171
    # Every token of a sequence carries its sequence's value, so the per-sequence mean is that value;
    # loss = -(1.105171 - 0.8 + 1.2 - 1.105171) / 4 = -0.1.
    # Gradient (GSPO-token: d s_{i,t} / d log pi_t = s_i), d loss / d log pi_t = -A_i s_i / (|y_i| N):
    #   row 0: -1.105171 / (2 * 4) = -0.138146 on both tokens; row 3: +1.105171 / (1 * 4) = 0.276293;
    #   rows 1 and 2 clipped: 0; padding: 0.
    loss, stats, grad = loss_and_grad(GSPOLoss(epsilon_low=0.2, epsilon_high=0.2))
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    e01 = math.exp(0.1)
    expected = torch.tensor([[-e01 / 8, -e01 / 8, 0], [0, 0, 0], [0, 0, 0], [e01 / 4, 0, 0]], dtype=grad.dtype)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    # Statistics over completions: 1 of 4 clipped low, 1 of 4 high; the mean of the four s_i.
    assert stats.clip_low_fraction.item() == pytest.approx(0.25)
    assert stats.clip_high_fraction.item() == pytest.approx(0.25)
    mean_s = (2 * e01 + math.exp(-0.3) + math.exp(0.4)) / 4  # 1.110746
    assert stats.ratio_mean.item() == pytest.approx(mean_s, abs=1e-12)


def test_gspo_gradient_is_the_sequence_objective_gradient():
    # Unclipped, the token form's gradient equals that of -mean_i(s_i A_i) with s_i a differentiable
    # function of the mean log-ratio (the paper's eq. 11 against its eq. 13).
    logprobs, old, advantages, mask = example()
    loss, _ = GSPOLoss(epsilon_low=0.9, epsilon_high=10.0)(logprobs, advantages, mask, old_logprobs=old)
    (grad,) = torch.autograd.grad(loss, logprobs)
    valid = mask.bool()
    log_s = torch.where(valid, logprobs - old, 0.0).sum(1) / valid.sum(1)
    (grad_sequence,) = torch.autograd.grad(-(torch.exp(log_s) * advantages).mean(), logprobs)
    torch.testing.assert_close(grad, grad_sequence, rtol=0, atol=1e-12)


def test_cispo_by_hand():
    # Weights w = sg(clip(r, floor, 1.2)), r = e^{log-ratio}; objective w A log pi, log pi = -1 + log-ratio.
    #   row 0 (A=+1): r [1.221403 -> w 1.2 (capped), 1.0];      log pi [-0.8, -1.0]   -> [-0.96, -1.0]
    #   row 1 (A=-1): r [0.548812, 0.740818, 1.0], no floor;  log pi [-1.6, -1.3, -1.0]
    #                 -> [0.548812 * 1.6, 0.740818 * 1.3, 1.0] = [0.878099, 0.963063, 1.0]
    #   row 2 (A=+1): r [1.349859, 1.648721, 1.491825] -> w 1.2 each; log pi [-0.7, -0.5, -0.6]
    #                 -> 1.2 * [-0.7, -0.5, -0.6] = [-0.84, -0.6, -0.72]
    #   row 3 (A=-1): r [1.105171];                             log pi [-0.9]     -> [0.994654]
    # Sum = -1.96 + 2.841162 - 2.16 + 0.994654 = -0.284184 over 9 tokens; dapo with a global count
    # of 18 tokens: loss = 0.284184 / 18 = 0.015788.
    # Gradient d loss / d log pi = -w A / 18: every valid token gets one (clipped ones too).
    loss, stats, grad = loss_and_grad(CISPOLoss(epsilon_high=0.2), num_tokens=18.0)
    r = [[math.exp(x) for x in row] for row in LOG_RATIOS]
    total = (-1.2 * 0.8 - 1.0) + (r[1][0] * 1.6 + r[1][1] * 1.3 + 1.0) - 1.2 * 1.8 + r[3][0] * 0.9
    assert total == pytest.approx(-0.284184, abs=1e-6)
    assert loss.item() == pytest.approx(-total / 18, abs=1e-12)
    expected = torch.tensor(
        [[-1.2, -1.0, 0], [r[1][0], r[1][1], 1.0], [-1.2, -1.2, -1.2], [r[3][0], 0, 0]], dtype=grad.dtype
    ) / 18
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    # Capped weights: row 0 token 0 and all of row 2, 4 of 9 tokens; no floor, nothing raised.
    assert stats.clip_high_fraction.item() == pytest.approx(4 / 9)
    assert stats.clip_low_fraction.item() == 0
    # With a floor 1 - 0.3 = 0.7, row 1's first weight 0.548812 becomes 0.7 (1 of 9 tokens).
    _, stats, grad = loss_and_grad(CISPOLoss(epsilon_low=0.3, epsilon_high=0.2), num_tokens=18.0)
    assert grad[1, 0].item() == pytest.approx(0.7 / 18, abs=1e-12)
    assert stats.clip_low_fraction.item() == pytest.approx(1 / 9)


def test_sapo_by_hand():
    # Gate f(r) = 4/tau sigmoid(tau (r - 1)), tau 1.0 for A > 0 and 1.05 otherwise; objective f A;
    # d f / d log pi = 4 p (1 - p) r with p = sigmoid(tau (r - 1)). Aggregation grpo:
    # loss = -(1/4) sum_i mean_t f A, d loss / d log pi_t = -A w_t / (4 |y_i|).
    loss, stats, grad = loss_and_grad(SAPOLoss())
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731

    def gate(x, tau):  # (f, w) at log-ratio x
        r = math.exp(x)
        p = sig(tau * (r - 1))
        return 4 / tau * p, 4 * p * (1 - p) * r

    rows = [(0, 1.0, [0.2, 0.0]), (1, 1.05, [-0.6, -0.3, 0.0]), (2, 1.0, [0.3, 0.5, 0.4]), (3, 1.05, [0.1])]
    objective, expected = 0.0, torch.zeros(4, 3, dtype=grad.dtype)
    for i, tau, xs in rows:
        a = ADVANTAGES[i]
        objective += sum(gate(x, tau)[0] * a for x in xs) / len(xs)
        for t, x in enumerate(xs):
            expected[i, t] = -a * gate(x, tau)[1] / (4 * len(xs))
    # Spelled out for row 0: f(e^0.2 = 1.221403) = 4 sigmoid(0.221403) = 4 x 0.555126 = 2.220503, f(1) = 2; mean 2.110251.
    assert gate(0.2, 1.0)[0] == pytest.approx(2.220503, abs=1e-6)
    # On-policy tokens (r = 1) keep GRPO's weight 1 whatever tau: row 1's last token, 1.05 there.
    assert gate(0.0, 1.05)[1] == 1.0 and expected[1, 2].item() == pytest.approx(1 / 12)
    assert loss.item() == pytest.approx(-objective / 4, abs=1e-12)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert stats.clip_low_fraction.item() == 0 and stats.clip_high_fraction.item() == 0


def test_sapo_is_asymmetric():
    # The same ratio 1.5 fades faster for a negative advantage: w = 4 p (1 - p) 1.5 with
    # p = sigmoid(0.5 tau): tau 1.0 -> 1.411..., tau 1.05 -> 1.4035...; larger tau_neg, smaller weight.
    logprobs = torch.tensor([[math.log(1.5)], [math.log(1.5)]], dtype=torch.float64, requires_grad=True)
    loss, _ = SAPOLoss(tau_pos=1.0, tau_neg=3.0, aggregation="bnpo")(
        logprobs, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 1), old_logprobs=torch.zeros(2, 1)
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    p_pos, p_neg = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.5))
    assert grad[0, 0].item() == pytest.approx(-4 * p_pos * (1 - p_pos) * 1.5 / 2, abs=1e-12)
    assert grad[1, 0].item() == pytest.approx(4 * p_neg * (1 - p_neg) * 1.5 / 2, abs=1e-12)
    assert abs(grad[1, 0].item()) < abs(grad[0, 0].item())


LOSSES = {
    "grpo": lambda beta: GRPOLoss(beta=beta),
    "gspo": lambda beta: GSPOLoss(epsilon_low=0.2, epsilon_high=0.2, beta=beta),
    "cispo": lambda beta: CISPOLoss(epsilon_high=0.2, beta=beta),
    "sapo": lambda beta: SAPOLoss(beta=beta),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_kl_term_is_added_the_same_way(name):
    # k3 per token with delta = log pi_ref - log pi: e^delta - delta - 1; reference 0.5 below the
    # policy on every token: e^-0.5 + 0.5 - 1 = 0.106531. beta 0.1 adds 0.1 x that token mean under
    # the loss's aggregation: for grpo/gspo/sapo (mean of means) and cispo (bnpo here) alike, 0.0106531.
    logprobs, old, advantages, mask = example()
    ref = logprobs.detach() - 0.5
    kwargs = dict(old_logprobs=old, ref_logprobs=ref)
    with_kl, stats = LOSSES[name](0.1)(logprobs, advantages, mask, **kwargs)
    without, _ = LOSSES[name](0.0)(logprobs, advantages, mask, **kwargs)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert (with_kl - without).item() == pytest.approx(0.1 * k3, abs=1e-12)
    assert stats.kl.item() == pytest.approx(k3, abs=1e-12)
    assert LOSSES[name](0.1).needs_reference and not LOSSES[name](0.0).needs_reference
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        LOSSES[name](0.1)(logprobs, advantages, mask, old_logprobs=old)


@pytest.mark.parametrize("name", list(LOSSES))
def test_micro_batch_shares_add_up_to_the_whole_step(name):
    # As tests/test_grpo_loss.py does for GRPO's aggregations: shares of three unequal micro-batches,
    # each normalised by the whole step's totals, add up to the one-call loss, gradient and statistics.
    gen = torch.Generator().manual_seed(11)
    logprobs = (-torch.rand(6, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    ref = logprobs.detach() + 0.2 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    advantages = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    module = LOSSES[name](0.1)
    num_tokens = 30.0 if module.needs_global_token_count else None
    whole, whole_stats = module(logprobs, advantages, mask, old_logprobs=old, ref_logprobs=ref, num_tokens=num_tokens)
    (expected_grad,) = torch.autograd.grad(whole, logprobs)
    totals = StepTotals.of(mask)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    shares = [
        module(logprobs[s], advantages[s], mask[s], old_logprobs=old[s], ref_logprobs=ref[s], num_tokens=num_tokens,
               totals=totals)
        for s in parts
    ]
    summed = sum(loss for loss, _ in shares)
    (grad,) = torch.autograd.grad(summed, logprobs)
    assert summed.item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert expected_grad.abs().max() > 1e-3
    stats = sum_stats([s for _, s in shares])
    for field in ("policy_loss", "kl", "clip_low_fraction", "clip_high_fraction", "ratio_mean"):
        assert getattr(stats, field).item() == pytest.approx(getattr(whole_stats, field).item(), abs=1e-12), field
    if name != "sapo":  # clipping is exercised (SAPO has none)
        assert whole_stats.clip_low_fraction > 0 or whole_stats.clip_high_fraction > 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GSPOLoss(epsilon_low=1.0), "GSPOLoss: epsilon_low must be in \\[0, 1\\), got 1.0"),
        (lambda: CISPOLoss(epsilon_high=-1.0), "CISPOLoss: epsilon_high must be >= 0, got -1.0"),
        (lambda: SAPOLoss(tau_neg=0.0), "SAPOLoss: tau_neg must be a finite number > 0, got 0.0"),
        (lambda: CISPOLoss(aggregation="seq"), "CISPOLoss: aggregation must be one of .* got 'seq'"),
        (lambda: SAPOLoss(beta=-1.0), "SAPOLoss: beta must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_settings_are_quoted(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_config_names_the_class_and_its_settings():
    assert CISPOLoss(epsilon_high=3.0).config() == {
        "class_path": "pathvlm_lightning.grpo.losses.CISPOLoss",
        "init_args": {"epsilon_low": None, "epsilon_high": 3.0, "aggregation": "dapo", "beta": 0.0},
    }
