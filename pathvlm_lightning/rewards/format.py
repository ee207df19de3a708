"""The paper's format reward: reasoning in ``<think>``, then the answer in ``<answer>``."""

from __future__ import annotations

from pathvlm_lightning.rewards.completion import ParsedCompletion, as_parsed


def format_reward(completion: str | ParsedCompletion) -> float:
    """1.0 when ``completion`` is exactly ``<think>reasoning</think><answer>answer</answer>``
    (one of each tag, lower case, in that order, nothing but whitespace around or between the
    blocks, neither block blank), else 0.0: the parse's ``well_formed``
    (:mod:`pathvlm_lightning.rewards.completion`).

    >>> format_reward("<think>Nuclear atypia.</think>\\n<answer>B) Melanoma</answer>")
    1.0
    >>> format_reward("<answer>B) Melanoma</answer><think>Nuclear atypia.</think>")
    0.0
    >>> format_reward("<think> </think><answer>B</answer>")
    0.0
    >>> format_reward("<think>a</think><answer>A</answer><answer>B</answer>")
    0.0
    """
    return 1.0 if as_parsed(completion, {}).well_formed else 0.0
