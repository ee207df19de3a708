"""The offline rubric stand-in: each rule, with the arithmetic worked out by hand."""

from __future__ import annotations

import doctest

import pytest

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards import rubric
from pathvlm_lightning.rewards.rubric import negated_options, rubric_scores

REC = VQARecord(
    id="q1", image="x.png", question="Nuclear size?",
    options={"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}, answer="A",
)
# Has a claim about the image, all three integrity elements and no error: features (purple, nuclei,
# crowded) in a sentence that states them ("are"), B and C ruled out, a knowledge term (pleomorphism).
FULL = "Purple nuclei are crowded, with pleomorphism. Not small. Option C is unlikely"


def think(text: str, answer: str = "A) Large") -> str:
    return f"<think>{text}</think><answer>{answer}</answer>"


def test_rubric_doctests_pass():
    assert doctest.testmod(rubric).failed == 0


def test_full_marks():
    assert rubric_scores(think(FULL), REC) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("reasoning", "integrity"),
    [
        ("Pleomorphism. Not small. Option C is unlikely", 0.0),  # no image features, so no claim: 0
        ("Purple nuclei are enlarged, with pleomorphism. Not small.", 0.6),  # only one option ruled out
        ("Purple nuclei are crowded. Not small. Option C is unlikely", 0.6),  # no knowledge term
        ("Purple nuclei are crowded. Not small.", 0.2),  # two missing: 1 - 0.8
        ("It is this one.", 0.0),  # three missing: 1 - 1.2, floored at 0
    ],
)
def test_integrity_loses_0_4_per_missing_element(reasoning, integrity):
    assert rubric_scores(think(reasoning), REC)[0] == integrity


def test_ruling_out_the_chosen_option_does_not_count_as_elimination():
    # B ruled out, and A (the answer) "not" mentioned -> only one OTHER option eliminated,
    # and the answer was ruled out: a contradiction.
    integrity, knowledge = rubric_scores(think("Purple nuclei are seen, with pleomorphism. Not small. Not large."), REC)
    assert (integrity, knowledge) == (0.6, 0.6)


@pytest.mark.parametrize(
    ("extra", "knowledge"),
    [
        ("Hematoxylin stains the nuclei pink", 0.6),  # a stain given a colour it does not give
        ("DAB gives a blue signal", 0.6),
        ("The answer is B", 0.6),  # reasoning concludes another letter
        ("This is a bronchioloalveolar carcinoma", 0.6),  # retired term
        ("Hematoxylin stains the nuclei pink. The answer is B. Malignant fibrous histiocytoma", 0.0),
        ("Hematoxylin stains nuclei blue and eosin stains cytoplasm pink", 1.0),  # correct statement
    ],
)
def test_knowledge_loses_0_4_per_kind_of_error(extra, knowledge):
    assert rubric_scores(think(f"{FULL}. {extra}."), REC)[1] == knowledge


def test_answer_letter_with_another_options_text_is_a_contradiction():
    assert rubric_scores(think(FULL, answer="A) Small"), REC)[1] == 0.6


def test_a_negated_neighbour_is_not_read_as_negating_the_answer():
    # "not small, they are large": the negation is about "small", so answering Large is consistent.
    assert rubric_scores(think(f"{FULL}. The nuclei are not small, they are large"), REC) == (1.0, 1.0)


def test_negation_windows_and_letter_forms():
    assert negated_options("Rules out (B) and D) as well.", REC.options) == {"B", "D"}
    assert negated_options("Spindle cells are absent; B is incorrect.", REC.options) == {"B"}
    # A bare "A" is the article, and a sentence boundary ends a negation.
    assert negated_options("Not this. A large cell.", REC.options) == set()


def test_without_think_tags_the_whole_completion_is_read():
    assert rubric_scores(f"{FULL}. <answer>A) Large</answer>", REC) == (1.0, 1.0)


def test_no_answer_still_scores_the_reasoning():
    assert rubric_scores(f"<think>{FULL}</think>", REC) == (1.0, 1.0)
