"""The rubric cannot be gamed by the choice: one chain template, filled with each option of every
embedded question type as the conclusion and each pair of the others as the options it rules out,
gets one score. Before option texts were blanked, a grade chain concluding "atypical" or
"hyperplastic" earned the pathology-term element that "benign-appearing" did not, and "large",
"dense" or "red" counted as image features only when they were among the options quoted."""

from __future__ import annotations

from itertools import combinations

import pytest

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import OOD_MODALITIES, QUESTION_TYPES
from pathvlm_lightning.rewards.rubric import rubric_scores

QUESTIONS = [*QUESTION_TYPES, *(question for question, _ in OOD_MODALITIES.values())]
LETTERS = "ABCD"
# Wording fixed; {ruled_1}, {ruled_2} and {concluded} are option texts, {letter} the concluded letter.
TEMPLATES = {
    # 4 feature words (purple, nuclei, crowded, sheets) and a term (pleomorphism): nothing missing
    "complete": (
        "<think>The tile shows purple nuclei in crowded sheets, with pleomorphism. It is not {ruled_1}, and "
        "{ruled_2} is unlikely, so the answer is {concluded}.</think><answer>{letter}) {concluded}</answer>",
        (1.0, 1.0),
    ),
    # one feature word (purple) and no term: two elements missing, whichever options are quoted
    "thin": (
        "<think>The tile shows purple blobs. It is not {ruled_1}, and {ruled_2} is unlikely, so the answer "
        "is {concluded}.</think><answer>{letter}) {concluded}</answer>",
        (0.2, 1.0),
    ),
}


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: q.name)
def test_every_concluded_and_ruled_out_option_gets_the_same_score(question, template_name: str) -> None:
    template, expected = TEMPLATES[template_name]
    options = dict(zip(LETTERS, question.classes))
    record = VQARecord(id="q", image="x.png", question=question.phrasings[0], options=options, answer="A")
    scores = {}
    for concluded in LETTERS:
        others = [letter for letter in LETTERS if letter != concluded]
        for ruled_1, ruled_2 in combinations(others, 2):
            completion = template.format(
                ruled_1=options[ruled_1], ruled_2=options[ruled_2], concluded=options[concluded], letter=concluded
            )
            scores[(concluded, ruled_1, ruled_2)] = rubric_scores(completion, record)
    assert len(scores) == 12
    assert set(scores.values()) == {expected}, scores
