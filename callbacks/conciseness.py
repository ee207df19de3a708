"""An example user reward: prefer short reasoning, but only in answers that are right.

Why: the paper reports that GRPO shortened outputs (base model 210 tokens on average, the
format + accuracy model 80) without losing accuracy. This reward asks for that directly. It pays
nothing for a wrong answer, so the policy cannot buy reward by answering briefly and badly.

Use it from the repository root by adding it to the module's rewards (``rewards+`` appends to the
base config's list)::

    model:
      init_args:
        rewards+:
          - class_path: callbacks.conciseness.ConcisenessReward
            init_args: {weight: 0.5, target_words: 60, max_words: 160}
"""

from __future__ import annotations

from collections.abc import Mapping

from typing_extensions import override

from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.accuracy import accuracy_reward
from pathvlm_lightning.rewards.completion import ParsedCompletion, as_parsed


def conciseness_score(
    completion: str | ParsedCompletion,
    answer: str,
    options: Mapping[str, str],
    target_words: int = 60,
    max_words: int = 160,
) -> float:
    """0 for an incorrect answer (see ``accuracy_reward``); for a correct one, 1.0 up to
    ``target_words`` words in the whole completion, falling linearly to 0.0 at ``max_words``.
    Words of the whole output count, tags included, so reasoning cannot hide outside ``<think>``.
    ``completion`` is the rollout's parse of the completion (a string is parsed first).

    >>> opts = {"A": "Lymphoma", "B": "Melanoma"}
    >>> right = "<think>Pigmented atypical cells.</think><answer>B) Melanoma</answer>"  # 4 words
    >>> conciseness_score(right, "B", opts, target_words=5, max_words=9)
    1.0
    >>> long = "<think>" + "word " * 6 + "</think><answer>B) Melanoma</answer>"  # 8 words
    >>> conciseness_score(long, "B", opts, target_words=5, max_words=9)
    0.25
    >>> conciseness_score(right.replace("B)", "A)").replace("Melanoma", "Lymphoma"), "B", opts)
    0.0
    """
    parsed = as_parsed(completion, options)
    if accuracy_reward(parsed, answer, options) == 0.0:
        return 0.0
    words = len(parsed.text.split())
    if words <= target_words:
        return 1.0
    return max(0.0, (max_words - words) / (max_words - target_words))


class ConcisenessReward(RewardCallback):
    """Rewards correct answers for brevity (see ``conciseness_score``).

    Args:
        weight: multiplies the score before rewards are summed.
        target_words: completions up to this many words score 1.
        max_words: completions of this many words or more score 0; must exceed ``target_words``.
        name: logged as ``reward/<name>``; defaults to ``"conciseness"``.
    """

    default_name = "conciseness"

    def __init__(
        self,
        weight: float = 1.0,
        target_words: int = 60,
        max_words: int = 160,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        if not (isinstance(target_words, int) and target_words >= 0):
            raise ValueError(
                f"ConcisenessReward: target_words must be an int >= 0, got {target_words!r}"
            )
        if not (isinstance(max_words, int) and max_words > target_words):
            raise ValueError(
                f"ConcisenessReward: max_words must be an int > target_words={target_words}, "
                f"got {max_words!r}"
            )
        self._target_words = target_words
        self._max_words = max_words

    @override
    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        return conciseness_score(
            completion, record.answer, record.options, self._target_words, self._max_words
        )
