import math

import pytest
import torch

from pathvlm_lightning.grpo.advantages import finite_std, group_advantages, zero_variance_groups

NAN = float("nan")


def test_group_scale_by_hand_with_a_zero_variance_group():
    # Group 1 [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.5773503,
    # advantage +-0.5 / (0.5773503 + 1e-4) = +-0.8658754.
    # Group 2 [2, 2, 2, 2]: zero variance, all centred values 0 -> 0 (not 0/0).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    a = 0.8658754
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))


def test_unbiased_std_matches_torch_std_on_random_groups():
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(3, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected.reshape(-1))


def test_nan_reward_is_left_out_and_gets_zero():
    # Finite [1, 0, 0]: mean 1/3, centred [2/3, -1/3, -1/3], unbiased var (4/9 + 1/9 + 1/9) / 2
    # = 1/3, std 0.5773503; advantages 0.6666667 / 0.5774503 = 1.1545006 and -0.5772503.
    rewards = torch.tensor([1.0, NAN, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1.1545006, 0.0, -0.5772503, -0.5772503]))


def test_groups_with_fewer_than_two_finite_rewards_give_zeros():
    rewards = torch.tensor([NAN, 3.0, NAN, NAN])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, group_size=2, scale=scale)
        assert torch.equal(adv, torch.zeros(4)), scale


def test_batch_scale_by_hand():
    # Groups [1, 0] and [2, 2] (G = 2): centred [0.5, -0.5, 0, 0]. Batch [1, 0, 2, 2]: mean 1.25,
    # squared deviations 0.0625 + 1.5625 + 0.5625 + 0.5625 = 2.75, unbiased std sqrt(2.75 / 3)
    # = 0.9574271; 0.5 / (0.9574271 + 1e-4) = 0.5221784.
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2, scale="batch")
    torch.testing.assert_close(adv, torch.tensor([0.5221784, -0.5221784, 0.0, 0.0]))


def test_none_scale_only_centres():
    # Group [3, 1, NaN]: mean 2 over the finite ones -> [1, -1, 0]; [0, 0, 6]: mean 2 -> [-2, -2, 4].
    rewards = torch.tensor([3.0, 1.0, NAN, 0.0, 0.0, 6.0])
    adv = group_advantages(rewards, group_size=3, scale="none")
    assert adv.tolist() == [1.0, -1.0, 0.0, -2.0, -2.0, 4.0]


def test_eps_zero_on_a_spread_group_is_exact_standardisation():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=0.0)
    assert adv[0].item() == pytest.approx(math.sqrt(3) / 2)


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.5, 0.0, NAN, 2.0, NAN, NAN, 1.0, 1.0, NAN, 1.0])
    # G = 2: [1, 1] equal; [.5, 0] spread; [NaN, 2] one finite; [NaN, NaN] none; [1, 1]; [NaN, 1].
    expected = [True, False, True, True, True, True]
    assert zero_variance_groups(rewards, group_size=2).tolist() == expected
    # G = 4: [1, 1, .5, 0] spread; [NaN, 2, NaN, NaN] one finite; [1, 1, NaN, 1] equal finite.
    assert zero_variance_groups(rewards, group_size=4).tolist() == [False, True, True]


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([2, 0]), group_size=2, scale="none")
    assert adv.tolist() == [1.0, -1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rewards": torch.ones(2, 2), "group_size": 2}, r"1-D \[B\*G\], got shape \(2, 2\)"),
        ({"rewards": torch.ones(6), "group_size": 4}, "divide the 6 rewards, got 4"),
        ({"rewards": torch.ones(4), "group_size": 0}, "got 0"),
        ({"rewards": torch.ones(4), "group_size": 2, "scale": "std"}, "got 'std'"),
        ({"rewards": torch.ones(4), "group_size": 2, "eps": -1.0}, "got -1.0"),
        ({"rewards": torch.tensor([1.0, math.inf]), "group_size": 2}, r"got \[1.0, inf\]"),
    ],
)
def test_bad_arguments_are_quoted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)


def test_batch_std_from_a_larger_batch_replaces_the_local_one():
    # A rank's rewards [1, 0, 3, 3] with the global batch's std 2.0: group-centred (0.5, -0.5, 0, 0) / 2
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    out = group_advantages(rewards, group_size=2, scale="batch", eps=0.0, batch_std=torch.tensor(2.0))
    torch.testing.assert_close(out, torch.tensor([0.25, -0.25, 0.0, 0.0]))
    local = group_advantages(rewards, group_size=2, scale="batch", eps=0.0)  # std of [1, 0, 3, 3] = 1.5
    torch.testing.assert_close(local, torch.tensor([0.5, -0.5, 0.0, 0.0]) / 1.5)
    assert finite_std(torch.tensor([1.0, float("nan"), 3.0])).item() == pytest.approx(2**0.5)
    assert finite_std(torch.tensor([1.0, float("nan")])).item() == 0.0
    with pytest.raises(ValueError, match="batch_std is only used by scale 'batch', not 'group'"):
        group_advantages(rewards, group_size=2, scale="group", batch_std=1.0)
