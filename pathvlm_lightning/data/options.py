"""Options and answers in the shapes the releases write them, turned into ``{"A": text}`` and a letter.

Options come as a dict letter -> text, a list of texts (bare or carrying their letter, PathMMU's
``"A) Random distribution"``), lines ``A) text`` in one string, or, in the VLM-R1 lineage, inside
the problem text: after an ``Options:`` line (the paper's code) or inline with no header
(``... image? A)Mammogram, B)PET, C)CT``, Med-R1's public conversions). Answers come as a letter,
``"B) text"``, or the option text itself.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

from pathvlm_lightning.data.errors import InvalidRecord

OPTION_LETTERS = string.ascii_uppercase

# "A) text", "(A) text", "A. text", "A: text"
_LABELLED = re.compile(r"^\s*\(?([A-Za-z])[\)\.:]\s*(.*?)\s*$", re.DOTALL)
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*$")
_OPTIONS_HEADER = re.compile(r"^\s*options\s*:\s*(.*)$", re.IGNORECASE)
# An inline option marker: a capital letter and ")" not glued to a word ("(PET)" is not one).
_INLINE_MARKER = re.compile(r"(?<![A-Za-z0-9])([A-Z])\)")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_options(value: Any) -> dict[str, str]:
    """Options in any accepted shape -> ``{"A": text, ...}`` in letter order.

    >>> parse_options(["red", "blue"])
    {'A': 'red', 'B': 'blue'}
    >>> parse_options("A) red\\nB) blue")
    {'A': 'red', 'B': 'blue'}
    """
    if value is None:
        raise InvalidRecord("missing_field", "has no options")
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidRecord("bad_options", f"options {value!r} look like JSON but do not parse: {err}") from err
    if isinstance(value, Mapping):
        options = {}
        for key, text in value.items():
            match = _BARE_LETTER.match(str(key))
            if match is None:
                raise InvalidRecord("bad_options", f"option key {key!r} is not a letter (options {dict(value)!r})")
            if text is not None and str(text).strip():
                options[match.group(1).upper()] = str(text).strip()
        return dict(sorted(options.items()))
    if isinstance(value, str):
        return _parse_option_lines([line for line in value.splitlines() if line.strip()], value)
    if isinstance(value, (list, tuple)):
        texts = [str(t).strip() for t in value if t is not None and str(t).strip()]
        labelled = [_LABELLED.match(t) for t in texts]
        if texts and all(m and m.group(1).upper() == OPTION_LETTERS[i] for i, m in enumerate(labelled)):
            return {m.group(1).upper(): m.group(2) for m in labelled}  # type: ignore[union-attr]
        if len(texts) > len(OPTION_LETTERS):
            raise InvalidRecord("bad_options", f"has {len(texts)} options; at most {len(OPTION_LETTERS)} supported")
        return dict(zip(OPTION_LETTERS, texts))
    raise InvalidRecord("bad_options", f"options {value!r} are neither a dict, a list nor text")


def parse_option_lines(lines: list[str], original: str | None = None) -> dict[str, str]:
    """Lines ``A) text`` (or ``(A) text``, ``A. text``, ``A: text``) -> ``{"A": text, ...}``; a line
    of another form or a letter given twice raises :class:`InvalidRecord` (``bad_options``).

    >>> parse_option_lines(["A) red", "(b) blue"])
    {'A': 'red', 'B': 'blue'}
    """
    return _parse_option_lines(lines, "\n".join(lines) if original is None else original)


def _parse_option_lines(lines: list[str], original: str) -> dict[str, str]:
    options = {}
    for line in lines:
        match = _LABELLED.match(line)
        if match is None:
            raise InvalidRecord("bad_options", f"option line {line!r} is not of the form 'A) text' (in {original!r})")
        letter = match.group(1).upper()
        if letter in options:
            raise InvalidRecord("bad_options", f"option {letter} appears twice in {original!r}")
        options[letter] = match.group(2)
    return dict(sorted(options.items()))


def split_inline_options(text: str) -> tuple[str, dict[str, str]] | None:
    """``"question? A)x, B)y"`` -> ``("question?", {"A": "x", "B": "y"})``; ``None`` when ``text``
    has no run of markers ``A)``, ``B)``, ... (at least two). The last such run is taken, so a
    question that itself mentions ``A)`` keeps it.

    >>> split_inline_options("Which technique? A)Mammogram, B)Positron emission tomography (PET), C)CT")
    ('Which technique?', {'A': 'Mammogram', 'B': 'Positron emission tomography (PET)', 'C': 'CT'})
    """
    markers = list(_INLINE_MARKER.finditer(text))
    for first in reversed(range(len(markers))):
        if markers[first].group(1) != "A":
            continue
        run = [markers[first]]
        for marker in markers[first + 1 :]:
            if len(run) < len(OPTION_LETTERS) and marker.group(1) == OPTION_LETTERS[len(run)]:
                run.append(marker)
        if len(run) < 2:
            continue
        ends = [m.start() for m in run[1:]] + [len(text)]
        options = {m.group(1): text[m.end() : end].strip().rstrip(",;").strip() for m, end in zip(run, ends)}
        return text[: run[0].start()].strip(), options
    return None


def split_vlm_r1_problem(problem: str) -> tuple[str, dict[str, str]]:
    """The question and options of a VLM-R1-lineage ``problem``: ``"question\\nOptions:\\nA) x\\nB) y"``
    (lines, or one inline line after the header) or ``"question A)x, B)y"`` (inline, no header).

    >>> split_vlm_r1_problem("How large?\\nOptions:\\nA) small\\nB) big")
    ('How large?', {'A': 'small', 'B': 'big'})
    """
    lines = problem.splitlines()
    for index, line in enumerate(lines):
        header = _OPTIONS_HEADER.match(line)
        if header:
            option_lines = [ln for ln in [header.group(1)] + lines[index + 1 :] if ln.strip()]
            question = "\n".join(lines[:index]).strip()
            inline = split_inline_options(" ".join(option_lines)) if len(option_lines) == 1 else None
            if inline is not None and not inline[0]:
                return question, inline[1]
            return question, _parse_option_lines(option_lines, problem)
    inline = split_inline_options(problem)
    if inline is None:
        raise InvalidRecord(
            "bad_options",
            f"problem text has neither an 'Options:' line nor inline options 'A) ..., B) ...': {problem!r}",
        )
    return inline


def split_vlm_r1_solution(solution: str) -> tuple[str, str]:
    """``"<think>why</think><answer>B) x</answer>"`` -> ``("why", "B) x")``; untagged text is the answer."""
    answer = _ANSWER.search(solution)
    think = _THINK.search(solution)
    explanation = think.group(1).strip() if think else ""
    return explanation, (answer.group(1) if answer else solution).strip()


def resolve_answer(value: Any, options: Mapping[str, str]) -> str:
    """The answer as a letter of ``options``: from ``"B"``, ``"B) text"`` or the option text itself.

    >>> resolve_answer("B) blue", {"A": "red", "B": "blue"})
    'B'
    >>> resolve_answer("red", {"A": "red", "B": "blue"})
    'A'
    """
    if value is None or not str(value).strip():
        raise InvalidRecord("missing_field", "has no answer")
    text = str(value).strip()
    letters = sorted(options)
    bare = _BARE_LETTER.match(text)
    if bare and not _matching_texts(text, options):
        letter = bare.group(1).upper()
        if letter not in options:
            raise InvalidRecord("answer_not_in_options", f"answer {text!r} is not one of the options {letters}")
        return letter
    labelled = _LABELLED.match(text)
    if labelled and labelled.group(1).upper() in options and not _matching_texts(text, options):
        letter, answer_text = labelled.group(1).upper(), labelled.group(2)
        if _normalise(answer_text) != _normalise(options[letter]):
            raise InvalidRecord(
                "answer_not_in_options",
                f"answer {text!r} names option {letter} but option {letter} is {options[letter]!r}",
            )
        return letter
    matches = _matching_texts(text, options)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidRecord("answer_not_in_options", f"answer {text!r} matches several options {matches}")
    raise InvalidRecord("answer_not_in_options", f"answer {text!r} is not one of the options {dict(options)!r}")


def _normalise(text: str) -> str:
    """Case, runs of whitespace and a closing full stop do not tell two texts apart (release
    answers repeat their option with such differences)."""
    return " ".join(text.split()).casefold().removesuffix(".").rstrip()


def _matching_texts(text: str, options: Mapping[str, str]) -> list[str]:
    return [letter for letter, option in options.items() if _normalise(option) == _normalise(text)]
