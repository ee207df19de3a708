import math

import pytest
import torch

from pathvlm_lightning.grpo.losses import GRPOLoss, StepTotals, sum_stats

# Two completions, old log-probs 0, so ratio = exp(logprobs) is chosen directly:
#   completion 0, A = +1, ratios [1.5, 1.0, pad]
#   completion 1, A = -1, ratios [0.5, 1.1, 1.0]
# Per-token loss -min(r * A, clip(r, 0.8, 1.2) * A):
#   (0,0) -min(1.5, 1.2) = -1.2 (clipped high)   (0,1) -min(1.0, 1.0) = -1.0
#   (1,0) -min(-0.5, -0.8) = 0.8 (clipped low)   (1,1) 1.1   (1,2) 1.0
# Sums: completion 0 -2.2 over 2 tokens, completion 1 2.9 over 3 tokens; all 0.7 over 5 tokens.
RATIOS = [[1.5, 1.0, 1.0], [0.5, 1.1, 1.0]]
MASK = [[1, 1, 0], [1, 1, 1]]
ADVANTAGES = [1.0, -1.0]


def hand_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logprobs = torch.tensor(RATIOS).log().requires_grad_()
    return logprobs, torch.zeros(2, 3), torch.tensor(ADVANTAGES), torch.tensor(MASK)


@pytest.mark.parametrize(
    ("kwargs", "num_tokens", "expected"),
    [
        # grpo: mean(-2.2 / 2, 2.9 / 3) = (-1.1 + 0.9666667) / 2
        ({"aggregation": "grpo"}, None, -0.0666667),
        # bnpo: 0.7 / 5
        ({"aggregation": "bnpo"}, None, 0.14),
        # dr_grpo: 0.7 / (2 completions * 4 max tokens)
        ({"aggregation": "dr_grpo"}, None, 0.0875),
        # dapo: 0.7 / 10 tokens in the whole (global) step; without the count it is bnpo
        ({"aggregation": "dapo"}, 10, 0.07),
        ({"aggregation": "dapo"}, None, 0.14),
    ],
)
def test_aggregations_by_hand(kwargs, num_tokens, expected):
    logprobs, old, advantages, mask = hand_inputs()
    loss, stats = GRPOLoss(beta=0.0, **kwargs).bind(max_completion_length=4)(
        logprobs, advantages, mask, old_logprobs=old, num_tokens=num_tokens
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.policy_loss.item() == pytest.approx(expected, abs=1e-6)  # no KL term
    # Clipped: (0,0) high with A > 0 and (1,0) low with A < 0, each 1 of 5 valid tokens.
    assert stats.clip_high_fraction.item() == pytest.approx(0.2)
    assert stats.clip_low_fraction.item() == pytest.approx(0.2)
    # (1.5 + 1.0 + 0.5 + 1.1 + 1.0) / 5, the padded ratio left out
    assert stats.ratio_mean.item() == pytest.approx(1.02)
    assert stats.kl is None


def test_grpo_gradients_by_hand():
    # d/dlogp of -r * A is -r * A (r = exp(logp - old)); grpo weighs a token 1 / (|o_i| * N).
    # Clipped tokens and padding get no gradient:
    #   (0,1): -1.0 * 1 / (2 * 2) = -0.25;  (1,1): 1.1 / (3 * 2) = 0.1833333;  (1,2): 1 / 6.
    logprobs, old, advantages, mask = hand_inputs()
    loss, _ = GRPOLoss(beta=0.0)(logprobs, advantages, mask, old_logprobs=old)
    loss.backward()
    expected = torch.tensor([[0.0, -0.25, 0.0], [0.0, 0.1833333, 0.1666667]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_clip_higher():
    # epsilon_high 0.28: (0,0) becomes -min(1.5, 1.28) = -1.28, so bnpo (0.7 - 0.08) / 5 = 0.124;
    # 1.5 is still above 1.28, so still clipped.
    logprobs, old, advantages, mask = hand_inputs()
    loss, stats = GRPOLoss(aggregation="bnpo", epsilon_high=0.28, beta=0.0)(
        logprobs, advantages, mask, old_logprobs=old
    )
    assert loss.item() == pytest.approx(0.124)
    assert stats.clip_high_fraction.item() == pytest.approx(0.2)


def test_clip_is_one_sided_pessimistic_bound():
    # Ratio 2.0 with A = -1: -min(-2.0, -1.2) = 2.0, not clipped, gradient -r * A = 2.0.
    # Ratio 0.5 with A = +1: -min(0.5, 0.8) = -0.5, not clipped, gradient -0.5.
    # bnpo over 2 tokens: loss (2.0 - 0.5) / 2 = 0.75, gradients [1.0, -0.25].
    logprobs = torch.tensor([[2.0], [0.5]]).log().requires_grad_()
    loss, stats = GRPOLoss(aggregation="bnpo", beta=0.0)(
        logprobs, torch.tensor([-1.0, 1.0]), torch.ones(2, 1), old_logprobs=torch.zeros(2, 1)
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.75)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[1.0], [-0.25]]))
    assert stats.clip_low_fraction.item() == 0.0
    assert stats.clip_high_fraction.item() == 0.0


def test_kl_term_by_hand_and_first_iteration_gradient():
    # One completion, A = 0.5, beta = 0.1, old = current (ratio 1, surrogate 0.5 per token).
    # ref - logp = [ln 2, 0] -> k3 = [2 - ln 2 - 1, 0] = [0.3068528, 0].
    # Per-token loss -(0.5 - 0.1 * k3) = [-0.4693147, -0.5]; grpo mean -0.4846574.
    # Gradient per token: -A * r + beta * (1 - exp(ref - logp)) = [-0.5 - 0.1, -0.5], over 2 tokens.
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2.0), -2.0]])
    loss, stats = GRPOLoss(beta=0.1)(
        logprobs, torch.tensor([0.5]), torch.ones(1, 2), ref_logprobs=ref
    )
    loss.backward()
    assert loss.item() == pytest.approx(-0.4846574)
    assert stats.policy_loss.item() == pytest.approx(-0.5)
    assert stats.kl.item() == pytest.approx(0.1534264)
    assert stats.ratio_mean.item() == pytest.approx(1.0)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.3, -0.25]]))


def test_beta_zero_logs_kl_without_adding_it():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2.0), -2.0]])
    loss, stats = GRPOLoss(beta=0.0)(
        logprobs, torch.tensor([0.5]), torch.ones(1, 2), ref_logprobs=ref
    )
    assert loss.item() == pytest.approx(-0.5)
    assert stats.kl.item() == pytest.approx(0.1534264)


def test_dapo_global_count_makes_micro_batches_add_up():
    # Gradient accumulation over two micro-batches of unequal token counts: dapo with the global
    # count sums to the token mean of the whole step; bnpo's per-micro-batch means do not.
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    advantages = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    whole, _ = GRPOLoss(aggregation="bnpo", beta=0.0)(logprobs, advantages, mask)
    total = int(mask.sum())
    dapo, bnpo = GRPOLoss(aggregation="dapo", beta=0.0), GRPOLoss(aggregation="bnpo", beta=0.0)
    halves = [slice(0, 2), slice(2, 4)]
    dapo_sum = sum(
        dapo(logprobs[h], advantages[h], mask[h], num_tokens=total)[0] for h in halves
    )
    bnpo_mean = sum(bnpo(logprobs[h], advantages[h], mask[h])[0] for h in halves) / 2
    assert dapo_sum.item() == pytest.approx(whole.item())
    assert bnpo_mean.item() != pytest.approx(whole.item())


def test_garbage_in_padding_stays_out():
    # Padding log-probs that would overflow exp must not leak NaN into the loss or gradient.
    logprobs = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1000.0]])
    ref = torch.tensor([[-1.0, 1000.0]])
    loss, stats = GRPOLoss(beta=0.04)(
        logprobs, torch.tensor([1.0]), torch.tensor([[True, False]]),
        old_logprobs=old, ref_logprobs=ref,
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1].item() == 0.0
    assert stats.ratio_mean.item() == pytest.approx(1.0)


def test_empty_completion_contributes_zero_in_grpo():
    # Completion 1 has no tokens: its mean is 0 / max(0, 1) = 0, and it still counts in the
    # mean over completions: (-1.0 + 0) / 2.
    loss, _ = GRPOLoss(beta=0.0)(
        torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.tensor([[1, 1], [0, 0]])
    )
    assert loss.item() == pytest.approx(-0.5)


# ---- parity with a direct transcription of the published formulas ----


def published_loss(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    """-J, written token by token from the papers.

    DeepSeekMath GRPO: J = 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta D_KL],
    D_KL = pi_ref/pi - log(pi_ref/pi) - 1, r = pi/pi_old.
    DAPO (and bnpo on one batch): J = sum_i sum_t [...] / sum_i |o_i|.
    Dr. GRPO: J = sum_i sum_t [...] / (G * MAX_TOKENS).
    """
    per_sequence = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            pi, pi_old, pi_ref = torch.exp(logp[i, t]), torch.exp(old[i, t]), torch.exp(ref[i, t])
            r = pi / pi_old
            surrogate = min(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
            kl = pi_ref / pi - torch.log(pi_ref / pi) - 1
            terms.append(surrogate - beta * kl)
        per_sequence.append(terms)
    group = len(per_sequence)
    every = [term for terms in per_sequence for term in terms]
    if loss_type == "grpo":
        objective = sum(sum(terms) / len(terms) for terms in per_sequence) / group
    elif loss_type == "dr_grpo":
        objective = sum(every) / (group * max_len)
    else:
        objective = sum(every) / len(every)
    return -objective


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_parity_with_published_formulas(loss_type, num_iterations, epsilon_high):
    gen = torch.Generator().manual_seed(num_iterations * 7 + len(loss_type))
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    logp = (-3 * torch.rand(6, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = logp.detach() + 0.3 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    if num_iterations == 1:
        old_ours, old_published = None, logp.detach()
    else:  # the sampling policy was a different, earlier one
        old_ours = old_published = logp.detach() + 0.4 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    max_len = 9
    module = GRPOLoss(aggregation=loss_type, epsilon_high=epsilon_high, beta=0.04).bind(max_completion_length=max_len)
    ours, stats = module(logp, adv, mask, old_logprobs=old_ours, ref_logprobs=ref)
    expected = published_loss(
        logp, old_published, ref, adv, mask, loss_type, 0.04, 0.2, epsilon_high, max_len
    )
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_expected,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad_ours, grad_expected)

    ratio = torch.exp(logp.detach() - old_published)
    valid = mask.bool()
    low = ((ratio < 0.8) & (adv[:, None] < 0) & valid).sum() / valid.sum()
    high = ((ratio > 1 + epsilon_high) & (adv[:, None] > 0) & valid).sum() / valid.sum()
    assert stats.clip_low_fraction.item() == pytest.approx(low.item())
    assert stats.clip_high_fraction.item() == pytest.approx(high.item())
    if num_iterations == 2:  # the inputs really exercise both clips
        assert low > 0 and high > 0
    else:
        assert low == 0 and high == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregation": "ppo"}, "got 'ppo'"),
        ({"epsilon_low": 1.0}, "got 1.0"),
        ({"epsilon_high": -0.1}, "got -0.1"),
        ({"beta": -0.01}, "got -0.01"),
        ({"beta": math.inf}, "got inf"),
    ],
)
def test_bad_construction_is_quoted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOLoss(**kwargs)
    with pytest.raises(ValueError, match="max_completion_length must be an integer > 0, got 0"):
        GRPOLoss().bind(max_completion_length=0)


def test_bad_inputs_are_quoted():
    logp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"needs ref_logprobs"):
        GRPOLoss(beta=0.04)(logp, adv, mask)
    with pytest.raises(ValueError, match=r"mask must match logprobs \(2, 3\), got \(2, 2\)"):
        GRPOLoss(beta=0.0)(logp, adv, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"advantages must be \[2\], got \(3,\)"):
        GRPOLoss(beta=0.0)(logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="exceed max_completion_length=2"):
        GRPOLoss(aggregation="dr_grpo", beta=0.0).bind(max_completion_length=2)(logp, adv, mask)
    with pytest.raises(ValueError, match=r"'dr_grpo' needs max_completion_length; the module binds"):
        GRPOLoss(aggregation="dr_grpo", beta=0.0)(logp, adv, mask)
    with pytest.raises(ValueError, match="only used by aggregation 'dapo', not 'bnpo'"):
        GRPOLoss(aggregation="bnpo", beta=0.0)(logp, adv, mask, num_tokens=5)
    with pytest.raises(ValueError, match="num_tokens must be > 0, got 0"):
        GRPOLoss(aggregation="dapo", beta=0.0)(logp, adv, mask, num_tokens=0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_add_up_to_the_whole_step(loss_type):
    # Three micro-batches of unequal sizes and token counts, every normaliser from StepTotals of the
    # whole step: loss, gradient and every statistic add up to the one-call values (float64, so
    # only summation order differs: 1e-12).
    gen = torch.Generator().manual_seed(5)
    logprobs = (-torch.rand(6, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    ref = logprobs.detach() + 0.2 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    advantages = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    num_tokens = 40.0 if loss_type == "dapo" else None  # e.g. the tokens of all ranks / world size
    module = GRPOLoss(aggregation=loss_type, beta=0.1).bind(max_completion_length=5)
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
    stats = sum_stats([s for _, s in shares])
    for field in ("policy_loss", "kl", "clip_low_fraction", "clip_high_fraction", "ratio_mean"):
        assert getattr(stats, field).item() == pytest.approx(getattr(whole_stats, field).item(), abs=1e-12), field
    assert whole_stats.clip_low_fraction > 0 or whole_stats.clip_high_fraction > 0  # clipping is exercised
    # without the step's totals each micro-batch normalises by itself and the shares do not add up
    alone = sum(module(logprobs[s], advantages[s], mask[s], old_logprobs=old[s], ref_logprobs=ref[s],
                       num_tokens=num_tokens)[0] for s in parts)
    if loss_type != "dapo":  # dapo's loss normaliser is num_tokens either way (its statistics are not)
        assert alone.item() != pytest.approx(whole.item(), abs=1e-3)
