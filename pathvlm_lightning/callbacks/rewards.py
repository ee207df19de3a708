"""The paper's two rule rewards, and the offline truth scorer, as callbacks: thin adapters over the
pure scoring functions."""

from __future__ import annotations

from typing_extensions import override

from pathvlm_lightning.callbacks.reward import RewardCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.accuracy import accuracy_reward
from pathvlm_lightning.rewards.format import format_reward
from pathvlm_lightning.rewards.truth import truth_reward


class FormatReward(RewardCallback):
    """1 for ``<think>...</think><answer>...</answer>``, else 0 (see ``rewards.format``).

    Args:
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"format"``.
    """

    default_name = "format"

    @override
    def score_text(self, completion: str, record: VQARecord) -> float:
        return format_reward(completion)


class AccuracyReward(RewardCallback):
    """1 when the answer names the record's correct option by letter and text, else 0 (see
    ``rewards.accuracy``).

    Args:
        weight: multiplies the score before rewards are summed.
        letter_only: judge the letter alone, ignoring the option text written after it.
        name: logged as ``reward/<name>``; defaults to ``"accuracy"``.
    """

    default_name = "accuracy"

    def __init__(
        self, weight: float = 1.0, letter_only: bool = False, name: str | None = None
    ) -> None:
        super().__init__(weight=weight, name=name)
        if not isinstance(letter_only, bool):
            raise ValueError(
                f"AccuracyReward: letter_only must be True or False, got {letter_only!r}"
            )
        self._letter_only = letter_only

    @override
    def score_text(self, completion: str, record: VQARecord) -> float:
        return accuracy_reward(
            completion, record.answer, record.options, letter_only=self._letter_only
        )


class TruthProcessReward(RewardCallback):
    """Image-aware offline process reward: true feature claims earn, false ones cost, against the
    tile's known features (``extra["spec"]``; see ``rewards.truth``). Embedded data only: a record
    without a tile spec is an error.

    Args:
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"truth"``.
    """

    default_name = "truth"

    @override
    def score_text(self, completion: str, record: VQARecord) -> float:
        return truth_reward(completion, record)
