"""The process-reward rubric checked by rules: a cheap, offline STAND-IN for the GPT-4o judge.

It reads words, not meaning. It cannot see the image or know whether a stated fact is true; it
only checks that the reasoning has the rubric's shape (describes the image, rules out options,
cites pathology terms) and catches a few errors that words give away (a stain given the wrong
colour, an answer the reasoning ruled out, a retired diagnosis). It lets the whole pipeline run
with no API key and no network; it is not the paper's reward.

Scores follow the paper's arithmetic: integrity = 1 - 0.4 per missing element, knowledge =
1 - 0.4 per kind of error, both floored at 0 (so each is one of 1.0, 0.6, 0.2, 0.0), with one
change: a chain that makes no claim about the image (:func:`image_claims`) scores 0 on both. The
paper's knowledge score starts at 1 and only loses for errors, so a chain that says nothing (":",
"Thought process:", an empty think block) made no error and earned it in full: half the process
reward for nothing (the "master key" replies of arXiv 2507.08794).
"""

from __future__ import annotations

import re

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.answer import normalize_text, resolve_choice
from pathvlm_lightning.rewards.completion import ParsedCompletion, as_parsed, reasoning_of

PENALTY = 0.4

_IMAGE_FEATURES = re.compile(
    r"\b(colou?r\w*|stain\w*|hue|pink|purple|blue|brown|red|violet|eosinophilic|basophilic|"
    r"nucle(?:us|i|ar|olus|oli)|chromatin|cytoplasm\w*|size|sized|large|small|enlarged|"
    r"densit\w*|dense|sparse|crowd\w*|arrange\w*|pattern\w*|architecture|shape\w*|round|oval|"
    r"spindle|irregular|borders?|margins?|texture|clusters?|sheets?|nests?|layers?|cells?)\b",
    re.IGNORECASE,
)
_KNOWLEDGE = re.compile(
    r"(haematoxylin|hematoxylin|\beosin\b|\bh&e\b|\bdab\b|immunohisto\w*|\bihc\b|pleomorph\w*|"
    r"mitos[ie]s|mitotic|nuclear[- ]to[- ]cytoplasmic|\bn:c\b|\bn/c\b|gland\w*|strom\w*|"
    r"epitheli\w*|carcinoma|adenoma|sarcoma|lymphoma|necros[ie]s|necrotic|kerat\w*|fibros[ie]s|"
    r"lymphocyt\w*|infiltrat\w*|atypi\w*|dysplas\w*|metaplas\w*|hyperplas\w*|neoplas\w*|"
    r"basement membrane|collagen\w*|invasi\w*|apoptos[ie]s|granulom\w*|malignan\w*|"
    r"differentiat\w*|anaplas\w*)",
    re.IGNORECASE,
)
_NEGATION_BEFORE = re.compile(
    r"\b(not|no|never|unlikely|rules?|ruled|ruling|exclud\w*|eliminat\w*|unlike|against|"
    r"isn't|aren't|doesn't|don't|cannot|can't|rather|instead|neither|nor|lacks?|lacking|without)\b",
    re.IGNORECASE,
)
_NEGATION_AFTER = re.compile(
    r"\b(not|unlikely|incorrect|wrong|excluded|ruled|eliminated|inconsistent|isn't|aren't|"
    r"doesn't|cannot|can't)\b",
    re.IGNORECASE,
)
# Keywords in any case, the letter itself a capital: "the answer is a large cell" names no option.
_CONCLUSION = re.compile(
    r"(?i:\b(?:(?:correct|best|final)\s+)?(?:answer|option|choice)\s+(?:is|would be|must be)\s*:?\s*"
    r"(?:option\s+)?)\(?([A-Z])\b(?!&)"
)
_CONCLUSION_AFTER = re.compile(
    r"(?i:\b(?:option|choice)\s+)\(?([A-Z])\)?(?i:\s+is\s+(?:the\s+)?(?:correct|right|best|most likely))"
)
_WRONG_STAIN_COLOUR = (
    # (stain, colour it does not give, words that make the sentence about another stain too)
    (re.compile(r"ha?ematoxylin", re.I), re.compile(r"\b(pink|red)\b", re.I), re.compile(r"\beosin\b", re.I)),
    (re.compile(r"\beosin\b", re.I), re.compile(r"\b(blue|purple)\b", re.I), re.compile(r"ha?ematoxylin", re.I)),
    (re.compile(r"\bdab\b", re.I), re.compile(r"\bblue\b", re.I), re.compile(r"ha?ematoxylin|counterstain", re.I)),
)
_OUTDATED = re.compile(
    r"bronchioloalveolar carcinoma|malignant fibrous histiocytoma|hemangiopericytoma|haemangiopericytoma|"
    r"primitive neuroectodermal tumou?r of the (?:cns|central nervous system)|oligoastrocytoma|"
    r"gliomatosis cerebri",
    re.IGNORECASE,
)
_STATING = re.compile(
    r"\b(is|are|was|were|be|been|shows?|showing|shown|appears?|appearing|looks?|lies?|lie|lying|seems?|"
    r"has|have|having|contains?|containing|fills?|filling|displays?|exhibits?|demonstrates?|reveals?|"
    r"sits?|sitting|visible|seen|sees?|stains?|stained|crowds?|occupy|occupies|measures?|measuring)\b",
    re.IGNORECASE,
)
_META = re.compile(r"\b(question|asks?|asked|asking)\b", re.IGNORECASE)
#: A claim is a sentence in which at most this share of the words are rubric terms (a salad is all terms).
MAX_TERM_SHARE = 0.8
#: A reasoning of 20+ words with fewer than this share of distinct words is a repetition: no claims.
MIN_DISTINCT_SHARE = 0.4
_JOINER = re.compile(r"[\s,]*(?:(?:and|or|nor)\b[\s,]*)?", re.IGNORECASE)
_SENTENCES = re.compile(r"[^.!?;\n]+")
_WORD = re.compile(r"[\w'&]+")


def _option_mentions(sentence: str, options: dict[str, str]) -> list[tuple[str, int, int]]:
    """(letter, start, end) of each reference to an option: "option B", "(B)", "B)", a bare
    capital B-Z (a bare "A" is the article), or the option's text."""
    found = []
    keys = {key.upper(): key for key in options}
    for pattern in (
        r"(?i:\b(?:option|choice|answer)\s*)\(?\s*([A-Z])\b\)?",
        r"\(([A-Z])\)",
        r"\b([A-Z])\)",
        r"(?<![\w&])([B-Z])(?![\w&])",
    ):
        for match in re.finditer(pattern, sentence):
            if match.group(1).upper() in keys:
                found.append((keys[match.group(1).upper()], match.start(), match.end()))
    return found + _option_text_spans(sentence, options)


def _option_text_spans(text: str, options: dict[str, str]) -> list[tuple[str, int, int]]:
    """(letter, start, end) of each place ``text`` quotes an option's text (3 characters or more).
    A shorter option inside a longer one's quote ("large" in "very large") is not quoted there.

    >>> _option_text_spans("Not large; very large.", {"C": "Large", "D": "Very large"})
    [('C', 4, 9), ('D', 11, 21)]
    """
    spans = []
    for key, option in options.items():
        words = normalize_text(option).split()
        if len(" ".join(words)) >= 3:
            pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
            spans += [(key, m.start(), m.end()) for m in re.finditer(pattern, text, re.IGNORECASE)]
    return [
        (key, start, end)
        for key, start, end in spans
        if not any(s <= start and end <= e and e - s > end - start for _, s, e in spans)
    ]


def _without_option_texts(text: str, options: dict[str, str]) -> str:
    """``text`` with every quote of an option's text blanked: the words of the answers themselves
    ("atypical", "large", "H&E") must not earn the rubric's elements, or a chain would score by its
    choice.

    >>> _without_option_texts("Not Atypical, so high-grade.", {"C": "atypical", "D": "High-grade"})
    'Not  , so  .'
    """
    for _, start, end in sorted(_option_text_spans(text, options), key=lambda span: -span[1]):
        text = text[:start] + " " + text[end:]
    return text


def negated_options(reasoning: str, options: dict[str, str]) -> set[str]:
    """Letters of the options the reasoning rules out: mentioned with a negation among the four
    words before ("not large", "rules out B"), counted from the previous option mentioned so a
    negation binds to the nearest option ("not small, they are large" negates only Small), or
    among the four words after ("B is unlikely"). Mentions joined by "and"/"or"/"nor"/commas share
    a negation ("rules out B and D").

    >>> opts = {"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}
    >>> sorted(negated_options("Cells are not small, they are large. Option C is unlikely.", opts))
    ['B', 'C']
    """
    negated = set()
    for sentence in _SENTENCES.findall(reasoning):
        previous_end, previous_negated = 0, False
        for letter, start, end in sorted(_option_mentions(sentence, options), key=lambda m: m[1]):
            gap = sentence[previous_end:start]
            after = " ".join(_WORD.findall(sentence[end:])[:4])
            before = " ".join(_WORD.findall(gap)[-4:])
            chained = previous_end > 0 and _JOINER.fullmatch(gap) is not None
            is_negated = (chained and previous_negated) or bool(
                _NEGATION_BEFORE.search(before) or _NEGATION_AFTER.search(after)
            )
            if is_negated:
                negated.add(letter)
            previous_end, previous_negated = max(previous_end, end), is_negated
    return negated


def _concluded_letters(reasoning: str, options: dict[str, str]) -> set[str]:
    keys = {key.upper(): key for key in options}
    letters = {m for pattern in (_CONCLUSION, _CONCLUSION_AFTER) for m in pattern.findall(reasoning)}
    return {keys[letter] for letter in letters if letter in keys}


def _wrong_definition(reasoning: str) -> bool:
    for sentence in _SENTENCES.findall(reasoning):
        for stain, colour, other in _WRONG_STAIN_COLOUR:
            if stain.search(sentence) and colour.search(sentence) and not other.search(sentence):
                return True
    return False


def _without_question(text: str, question: str) -> str:
    words = normalize_text(question).split()
    if not words:
        return text
    pattern = r"(?<!\w)" + r"\W+".join(map(re.escape, words)) + r"(?!\w)"
    return re.sub(pattern, " ", text, flags=re.IGNORECASE)


def image_claims(text: str, record: VQARecord) -> list[str]:
    """The sentences of the reasoning of ``text`` (a reasoning, or a whole completion read through
    its think blocks: :func:`~pathvlm_lightning.rewards.completion.reasoning_of`) that state
    something about the image, by words alone.

    A claim is a sentence, not a question, that has an image-feature word ("nuclei", "purple",
    "crowded", ...) and a stating verb ("are", "shows", "lie", ...), in which at most 80% of the
    words are rubric terms (a salad of terms states nothing), and that is not a repeat of an
    earlier claim. Quotes of the option texts and of the question are blanked first, and a
    sentence about the question ("the question asks ...") is not about the image. A reasoning of
    20 words or more in which fewer than 40% of the words are distinct is a repetition: no claims.

    >>> rec = VQARecord(id="q", image="x.png", question="How large are the nuclei?",
    ...                 options={"A": "Small", "B": "Large"}, answer="B")
    >>> image_claims("The nuclei are large and crowded. Nuclei pleomorphism mitoses atypia. "
    ...              "How large are the nuclei? The question asks about nuclear size.", rec)
    ['The nuclei are   and crowded']
    >>> image_claims("Thought process:", rec), image_claims("A) Small B) Large", rec)
    ([], [])
    """
    return _image_claims(reasoning_of(text), record)


def _image_claims(reasoning: str, record: VQARecord) -> list[str]:
    text = _without_question(_without_option_texts(reasoning, dict(record.options)), record.question)
    words = _WORD.findall(text)
    if len(words) >= 20 and len({w.casefold() for w in words}) < MIN_DISTINCT_SHARE * len(words):
        return []
    claims: list[str] = []
    seen: set[str] = set()
    for match in re.finditer(r"[^.!?;\n]+[.!?;]?", text):
        sentence = match.group(0)
        words = _WORD.findall(sentence)
        if not words or sentence.rstrip().endswith("?") or _META.search(sentence):
            continue
        if not (_IMAGE_FEATURES.search(sentence) and _STATING.search(sentence)):
            continue
        terms = len(_IMAGE_FEATURES.findall(sentence)) + len(_KNOWLEDGE.findall(sentence))
        key = " ".join(w.casefold() for w in words)
        if terms > MAX_TERM_SHARE * len(words) or key in seen:
            continue
        seen.add(key)
        claims.append(sentence.strip().rstrip(".!;").strip())
    return claims


def rubric_scores(completion: str | ParsedCompletion, record: VQARecord) -> tuple[float, float]:
    """(integrity, knowledge) of the reasoning of ``completion`` (its parse's ``reasoning``: the
    ``<think>`` text, or all of it; a string is parsed first).

    A reasoning with no claim about the image (:func:`image_claims`) scores (0.0, 0.0): no credit
    for saying nothing, restating the question, pasting the options or repeating terms. Otherwise
    integrity loses 0.4 for each missing: two or more distinct image-feature words; at least two
    options other than the chosen one ruled out; a pathology term. Words inside a quote of one of
    the record's option texts count towards neither the features nor the terms, so the score does
    not depend on which option the chain concludes or rules out. Knowledge loses 0.4 for each
    kind of error: a stain given a colour it does not give; a contradiction (the chosen option was
    ruled out, the reasoning concludes another letter, or the answer's letter and text name
    different options); a retired diagnostic term.

    >>> rec = VQARecord(id="q1", image="x.png", question="Nuclear size?",
    ...                 options={"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}, answer="A")
    >>> good = ("<think>H&E: purple nuclei are large and crowded, with pleomorphism. Not small; "
    ...         "option C is unlikely, no spindle shapes.</think><answer>A) Large</answer>")
    >>> rubric_scores(good, rec)
    (1.0, 1.0)
    >>> bad = "<think>The nuclei are not large. The answer is B.</think><answer>A) Large</answer>"
    >>> rubric_scores(bad, rec)  # "large" is an option's text: "nuclei" is its only feature word
    (0.0, 0.6)
    >>> rubric_scores("<think></think><answer>A) Large</answer>", rec), rubric_scores(":", rec)
    ((0.0, 0.0), (0.0, 0.0))
    """
    options = dict(record.options)
    read = as_parsed(completion, options)
    reasoning, parsed = read.reasoning, read.answer
    chosen = resolve_choice(parsed, options)
    claims = _image_claims(reasoning.strip(), record)  # as image_claims reads it (blank blocks joined)
    if not claims:
        return 0.0, 0.0
    negated = negated_options(reasoning, options)

    described = _without_option_texts(reasoning, options)
    features = {m.casefold() for claim in claims for m in _IMAGE_FEATURES.findall(claim)}
    missing = (len(features) < 2) + (len(negated - {chosen}) < 2) + (_KNOWLEDGE.search(described) is None)

    letter_text_clash = parsed.letter is not None and chosen is None and parsed.text is not None and any(
        normalize_text(parsed.text) == normalize_text(text) for key, text in options.items() if key != parsed.letter
    )
    contradiction = letter_text_clash or (
        chosen is not None and (chosen in negated or bool(_concluded_letters(reasoning, options) - {chosen}))
    )
    errors = _wrong_definition(reasoning) + contradiction + (_OUTDATED.search(reasoning) is not None)
    return _after_penalties(missing), _after_penalties(errors)


def _after_penalties(count: int) -> float:
    return max(0.0, round(1.0 - PENALTY * count, 6))
