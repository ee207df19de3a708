"""Master-key replies get no process reward from the offline rubric (issue 20, item 5).

Before the change a chain of ":" or an empty think block scored integrity 0.0 and knowledge 1.0
(knowledge started at 1 and only lost for errors) and a salad of pathology terms 0.6 and 1.0."""

from __future__ import annotations

import pytest

from pathvlm_lightning.callbacks.rewards import RubricProcessReward
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import QUESTION_TYPES
from pathvlm_lightning.rewards import master_keys
from pathvlm_lightning.rewards.master_keys import FOOLED_ABOVE, master_key_replies
from pathvlm_lightning.rewards.rubric import image_claims, rubric_scores

RECORDS = [
    VQARecord(id="q1", image="x.png", question="Nuclear size?",
              options={"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}, answer="A"),
    *(
        VQARecord(id=q.name, image="x.png", question=q.phrasings[-1], options=dict(zip("ABCD", q.classes)), answer="C")
        for q in QUESTION_TYPES
    ),
]
CASES = [(record, name, reply) for record in RECORDS for name, reply in master_key_replies(record).items()]


def test_doctests():
    import doctest

    assert doctest.testmod(master_keys).failed == 0


@pytest.mark.parametrize(("record", "name", "reply"), CASES, ids=[f"{r.id}-{n}" for r, n, _ in CASES])
def test_every_master_key_gets_zero_from_the_rubric(record, name, reply):
    assert image_claims(reply, record) == []
    assert rubric_scores(reply, record) == (0.0, 0.0)  # integrity and knowledge ("coherence")
    assert RubricProcessReward().score_text(reply, record) <= FOOLED_ABOVE


def test_one_true_claim_is_enough_to_be_graded_again():
    # The same empty chain plus one sentence about the image: graded by the paper's arithmetic again.
    record = RECORDS[0]
    reply = "<think>The nuclei are purple and crowded.</think><answer>A) Large</answer>"
    assert image_claims(reply, record) == ["The nuclei are purple and crowded"]
    # features purple, nuclei, crowded; no option ruled out, no term: 1 - 0.8; no error
    assert rubric_scores(reply, record) == (0.2, 1.0)


def test_a_repeated_claim_counts_once_and_a_long_repetition_counts_none():
    record = RECORDS[0]
    once = "The nuclei are purple."
    assert image_claims(f"{once} {once}", record) == ["The nuclei are purple"]
    assert image_claims(" ".join([once] * 8), record) == []  # 32 words, 4 distinct: a repetition
