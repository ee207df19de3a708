"""The paper's accuracy reward: 1 only when the answer names the fully correct option."""

from __future__ import annotations

from collections.abc import Mapping

from pathvlm_lightning.rewards.answer import normalize_text
from pathvlm_lightning.rewards.completion import ParsedCompletion, as_parsed


def accuracy_reward(
    completion: str | ParsedCompletion, answer: str, options: Mapping[str, str], letter_only: bool = False
) -> float:
    """1.0 when the completion's answer (its parse's ``answer``, see
    :mod:`pathvlm_lightning.rewards.completion`) names
    the correct option by letter AND by its text, e.g. ``B) Melanoma``, up to case, spacing and
    edge punctuation; else 0.0.

    The paper asks for letter and content, which is also the SFT target's shape, so a letter
    alone and a text alone both score 0 (text alone is unambiguous, but rewarding it would
    reward drifting away from the trained format). A correct letter with another option's text
    scores 0: the answer contradicts itself. With ``letter_only`` only the letter counts
    (whatever text follows it); a text without a letter still scores 0.

    Args:
        completion: the model's output, parsed (a string is parsed first).
        answer: the correct letter, a key of ``options``.
        options: letter -> option text.
        letter_only: judge the letter alone.

    >>> opts = {"A": "Lymphoma", "B": "Melanoma", "C": "Sarcoma", "D": "Carcinoma"}
    >>> accuracy_reward("<think>pigment</think><answer>B) melanoma.</answer>", "B", opts)
    1.0
    >>> accuracy_reward("<answer>B) Sarcoma</answer>", "B", opts)
    0.0
    >>> accuracy_reward("<answer>B</answer>", "B", opts)
    0.0
    >>> accuracy_reward("<answer>B</answer>", "B", opts, letter_only=True)
    1.0
    >>> accuracy_reward("<answer>Melanoma</answer>", "B", opts)
    0.0
    """
    if answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    parsed = as_parsed(completion, options).answer
    if parsed.letter != answer:
        return 0.0
    if letter_only:
        return 1.0
    if parsed.text is None or normalize_text(parsed.text) != normalize_text(options[answer]):
        return 0.0
    return 1.0
