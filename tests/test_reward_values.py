"""A reward's invalid value (+inf, -inf, a wrong shape, a non-number) stops the step with an error
that names the reward, the completion and its record; NaN (abstain) passes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pathvlm_lightning.callbacks import RewardCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.stages import Samples
from tests.test_grpo_module import LengthReward, grpo_fit, rollout_callback
from tests.test_rewards import make_rollout


class FixedReward(RewardCallback):
    """Returns ``values`` as the whole rollout's scores, whatever they are."""

    default_name = "fixed"

    def __init__(self, values: Any, name: str | None = None) -> None:
        super().__init__(name=name)
        self.values = values

    def score(self, rollout: Samples) -> Any:
        return self.values


class TextReward(RewardCallback):
    default_name = "text"

    def score_text(self, completion: str, record: VQARecord) -> Any:
        return None if completion == "bad" else 1.0


ROLLOUT = make_rollout(["a", "b", "c", "d"], group_size=2)  # records q0 (completions 0-1), q1 (2-3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            torch.tensor([0.0, 1.0, math.inf, 0.0]),
            r"reward 'judge' \(FixedReward\): score inf for completion 2 \(record 'q1'\) is infinite \(1 of 4",
        ),
        (
            torch.tensor([-math.inf, 1.0, 0.0, -math.inf]),
            r"score -inf for completion 0 \(record 'q0'\) is infinite \(2 of 4",
        ),
        (torch.zeros(2), r"reward 'judge' \(FixedReward\): score returned shape \[2\], expected \[4\]"),
        (torch.zeros(4, 1), r"returned shape \[4, 1\], expected \[4\]"),
        ([0.0, 1.0, 0.0, 1.0], r"reward 'judge' \(FixedReward\): score returned list, expected a tensor of shape"),
    ],
)
def test_an_invalid_score_names_the_reward(values: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        FixedReward(values, name="judge").checked_score(ROLLOUT)


def test_nan_abstains_and_integers_become_float() -> None:
    scores = FixedReward(torch.tensor([math.nan, 1.0, 0.5, math.nan])).checked_score(ROLLOUT)
    assert scores.dtype == torch.float32 and torch.isnan(scores).tolist() == [True, False, False, True]
    assert FixedReward(torch.tensor([1, 0, 1, 1])).checked_score(ROLLOUT).tolist() == [1.0, 0.0, 1.0, 1.0]


def test_a_non_number_from_score_text_names_the_reward_and_record() -> None:
    rollout = make_rollout(["ok", "ok", "ok", "bad"], group_size=2)
    message = r"reward 'text' \(TextReward\): score_completion returned None \(NoneType\) for completion 3 \(record 'q1'\)"
    with pytest.raises(TypeError, match=message):
        TextReward().checked_score(rollout)


def test_a_fit_with_an_infinite_reward_stops_naming_it(tmp_path: Path) -> None:
    infinite = FixedReward(torch.full((8,), math.inf), name="broken_judge")  # 2 prompts x G=4
    with pytest.raises(ValueError, match=r"reward 'broken_judge' \(FixedReward\): score inf for completion 0"):
        grpo_fit(tmp_path, [rollout_callback(), LengthReward(), infinite], max_steps=1, beta=0.0)
