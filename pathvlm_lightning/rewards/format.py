"""The paper's format reward: reasoning in ``<think>``, then the answer in ``<answer>``."""

from __future__ import annotations

import re

# The whole completion: optional whitespace, one think block, optional whitespace, one answer block,
# optional whitespace. The tag counts below forbid extra or nested tags the lazy groups could hide.
_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str) -> float:
    """1.0 when ``completion`` is exactly ``<think>reasoning</think><answer>answer</answer>``
    (one of each tag, lower case, in that order, nothing but whitespace around or between the
    blocks, neither block blank), else 0.0.

    >>> format_reward("<think>Nuclear atypia.</think>\\n<answer>B) Melanoma</answer>")
    1.0
    >>> format_reward("<answer>B) Melanoma</answer><think>Nuclear atypia.</think>")
    0.0
    >>> format_reward("<think> </think><answer>B</answer>")
    0.0
    >>> format_reward("<think>a</think><answer>A</answer><answer>B</answer>")
    0.0
    """
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _LAYOUT.fullmatch(completion)
    if match is None or not match.group(1).strip() or not match.group(2).strip():
        return 0.0
    return 1.0
