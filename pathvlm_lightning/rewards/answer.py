"""Finding the chosen option in a completion: the answer half of the one parse of a completion
(:mod:`pathvlm_lightning.rewards.completion`), read by the accuracy reward and the evaluation.

Which ``<answer>`` counts: reasoning may quote or try answers, so only the text after the last
``</think>`` is searched (the whole completion when there is none), and in it the LAST complete
``<answer>...</answer>`` block is the answer: a model that writes several answers is judged by its
final word, never by whichever of them happens to be right. Tags match in any case; an unclosed
``<answer>`` (a truncated completion) is no answer.

Inside the block a letter is recognised as ``B``, ``(B)``, ``[B]``, ``B)``, ``B.``, ``B:``,
``B -``, any case, optionally after ``Answer:``, ``Option`` or ``The answer is``; what follows the
letter is the option text. A letter followed by a bare space is not a letter ("A benign tumour"
is text), and a content that equals an option's text is always text. Letters that are not keys of
the options are not letters either.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

_THINK_END = re.compile(r"</think>", re.IGNORECASE)
# An answer block that holds no nested ``<answer>`` (so "<answer><answer>B</answer>" yields "B").
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.IGNORECASE | re.DOTALL)
_PREFIX = r"(?:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*)?"
_LETTER = re.compile(
    rf"^{_PREFIX}(?:\(\s*(\w)\s*\)|\[\s*(\w)\s*\]|(\w)\s*(?:[)\].:]|\s-\s|-\s|$))(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_WRAPPING = " \t\r\n*_`\"'"  # markdown emphasis and quotes around the whole answer
_EDGE_PUNCTUATION = " .,;:!?*_`\"'"


@dataclass(frozen=True)
class ParsedAnswer:
    """What the answer block says.

    ``letter`` is an options key (as spelled in the options) or None; ``text`` is the option text
    written after the letter, or the whole content when there is no letter, or None when empty;
    ``raw`` is the content of the answer block used, None when there is no answer block.
    """

    letter: str | None
    text: str | None
    raw: str | None


def normalize_text(text: str) -> str:
    """Compare-ready text: NFKC, case-folded, whitespace collapsed, edge punctuation dropped.

    Inner punctuation is kept on purpose: options such as "< 5 mitoses" and "> 5 mitoses" differ
    only there.

    >>> normalize_text("  Squamous   cell CARCINOMA. ")
    'squamous cell carcinoma'
    >>> normalize_text("< 5 mitoses") == normalize_text("> 5 mitoses")
    False
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split()).strip(_EDGE_PUNCTUATION)


def extract_answer(completion: str, options: Mapping[str, str]) -> ParsedAnswer:
    """Parse the final ``<answer>`` block of ``completion`` against the question's ``options``.

    Called once per completion, by :func:`~pathvlm_lightning.rewards.completion.parse_completion`;
    everything else reads that parse's ``answer``.

    >>> opts = {"A": "Lymphoma", "B": "Melanoma", "C": "Sarcoma", "D": "Carcinoma"}
    >>> extract_answer("<think>pigment</think><answer>(b) melanoma.</answer>", opts)
    ParsedAnswer(letter='B', text='melanoma.', raw='(b) melanoma.')
    >>> extract_answer("<answer> Sarcoma </answer>", opts)
    ParsedAnswer(letter=None, text='Sarcoma', raw=' Sarcoma ')
    >>> extract_answer("no tags, B", opts)
    ParsedAnswer(letter=None, text=None, raw=None)
    """
    ends = list(_THINK_END.finditer(completion))
    searched = completion[ends[-1].end() :] if ends else completion
    blocks = _ANSWER_BLOCK.findall(searched)
    if not blocks:
        return ParsedAnswer(letter=None, text=None, raw=None)
    raw = blocks[-1]
    content = raw.strip(_WRAPPING)
    option_texts = {normalize_text(text) for text in options.values()}
    match = None if normalize_text(content) in option_texts else _LETTER.match(content)
    keys = {key.upper(): key for key in options}
    if match is not None:
        letter = next(group for group in match.group(1, 2, 3) if group is not None)
        if letter.upper() in keys:
            text = match.group(4).strip(_WRAPPING)
            return ParsedAnswer(letter=keys[letter.upper()], text=text or None, raw=raw)
    return ParsedAnswer(letter=None, text=content or None, raw=raw)


def resolve_choice(parsed: ParsedAnswer, options: Mapping[str, str]) -> str | None:
    """The one option the answer commits to, for evaluation: its letter when the written text (if
    any) is that option's text; the option whose text it is when only text was written (None if
    several options share it); None when letter and text disagree or nothing was found.

    >>> opts = {"A": "Lymphoma", "B": "Melanoma"}
    >>> [resolve_choice(extract_answer(f"<answer>{a}</answer>", opts), opts)
    ...  for a in ("B", "b) Melanoma", "melanoma", "A) Melanoma", "Nevus")]
    ['B', 'B', 'B', None, None]
    """
    if parsed.letter is not None:
        written = parsed.text
        if written is None or normalize_text(written) == normalize_text(options[parsed.letter]):
            return parsed.letter
        return None
    if parsed.text is None:
        return None
    wanted = normalize_text(parsed.text)
    matches = [key for key, text in options.items() if normalize_text(text) == wanted]
    return matches[0] if len(matches) == 1 else None
