"""A completion read once: its reasoning, its answer, and whether it has the paper's layout.

This is the one rule by which the project reads what a model wrote. The rollout parses each
completion once (:func:`parse_completion`) and every reward (format, accuracy, the rubric, the
judge's request, users' rewards such as ``callbacks/conciseness.py``) and the evaluation read that
parse; nothing else searches a completion for tags.

- **reasoning**: the text inside ``<think>...</think>`` (tags in any case; every such block, each
  stripped, joined by newlines), or the whole completion, stripped, when there is none. This is
  what the rubric and the judge grade.
- **answer**: the final answer block, searched only in the text after the last ``</think>`` (the
  whole completion when there is none), so reasoning that quotes or tries answers is never taken
  for the answer; the letter and option text are read from it as
  :mod:`pathvlm_lightning.rewards.answer` describes. What the accuracy reward and the evaluation
  judge.
- **well_formed**: the whole completion is exactly ``<think>reasoning</think><answer>answer</answer>``
  (one of each tag, lower case, in that order, nothing but whitespace around or between the blocks,
  neither block blank). What the format reward pays for.

In a well-formed completion the three agree: the reasoning is the think block's text and the answer
is the answer block's. They differ only on malformed text, where each keeps the reading its consumer
has always had (a completion without tags is all reasoning and has no answer; text after the last
``</think>`` is where an answer may still be found).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pathvlm_lightning.rewards.answer import ParsedAnswer, extract_answer

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
# The whole completion: optional whitespace, one think block, optional whitespace, one answer block,
# optional whitespace. The tag counts below forbid extra or nested tags the lazy groups could hide.
_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class ParsedCompletion:
    """One completion read by the rule above. ``text`` is the completion as generated."""

    text: str
    reasoning: str
    answer: ParsedAnswer
    well_formed: bool


def parse_completion(text: str, options: Mapping[str, str]) -> ParsedCompletion:
    """Read ``text`` against its question's ``options`` (letters are options keys).

    >>> opts = {"A": "Lymphoma", "B": "Melanoma"}
    >>> parsed = parse_completion("<think> Pigment. </think>\\n<answer>B) Melanoma</answer>", opts)
    >>> parsed.reasoning, parsed.answer.letter, parsed.answer.text, parsed.well_formed
    ('Pigment.', 'B', 'Melanoma', True)
    >>> parsed = parse_completion("B) Melanoma", opts)
    >>> parsed.reasoning, parsed.answer.raw, parsed.well_formed
    ('B) Melanoma', None, False)
    """
    return ParsedCompletion(
        text=text, reasoning=reasoning_of(text), answer=extract_answer(text, options), well_formed=_well_formed(text)
    )


def as_parsed(completion: str | ParsedCompletion, options: Mapping[str, str]) -> ParsedCompletion:
    """``completion`` itself when already parsed, else its parse: lets the pure rewards take a
    plain string too (doctests, scripts); the training step always passes the rollout's parse."""
    return completion if isinstance(completion, ParsedCompletion) else parse_completion(completion, options)


def parse_completions(
    texts: Sequence[str], options: Sequence[Mapping[str, str]], group_size: int
) -> tuple[ParsedCompletion, ...]:
    """The parse of each of B*G completions; completion ``i`` answers the question ``i // group_size``,
    whose options are ``options[i // group_size]``."""
    if len(texts) != len(options) * group_size:
        raise ValueError(
            f"parse_completions: {len(texts)} completions for {len(options)} questions x {group_size} completions each"
        )
    return tuple(parse_completion(text, options[i // group_size]) for i, text in enumerate(texts))


def reasoning_of(text: str) -> str:
    """The reasoning of ``text`` by the rule above.

    >>> reasoning_of("<think>Nuclei are large.</think><answer>B) x</answer>")
    'Nuclei are large.'
    >>> reasoning_of("<think>a</think> <THINK>b</THINK>"), reasoning_of("  no tags ")
    ('a\\nb', 'no tags')
    """
    blocks = _THINK.findall(text)
    return "\n".join(b.strip() for b in blocks) if blocks else text.strip()


def _well_formed(text: str) -> bool:
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    match = _LAYOUT.fullmatch(text)
    return match is not None and bool(match.group(1).strip()) and bool(match.group(2).strip())
