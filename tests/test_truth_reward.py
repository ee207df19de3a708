"""The image-aware offline truth scorer (rewards/truth.py; issue 20, item 3): true feature claims earn,
false ones cost, no claim is worth 0, and the answer option by itself is never paid for."""

from __future__ import annotations

from itertools import combinations

import pytest

from pathvlm_lightning.callbacks import TruthProcessReward
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import QUESTION_TYPES
from pathvlm_lightning.rewards import truth
from pathvlm_lightning.rewards.master_keys import master_key_replies
from pathvlm_lightning.rewards.truth import truth_reward, truth_score

SPEC = {"stain": "IHC, partly DAB-positive", "size_grade": 1, "density_grade": 3, "arrangement": "sheet"}
TRUTH = {"stain": "IHC, partly DAB-positive", "size": 1, "density": 3}


def _record(question, answer: str = "C", spec: dict | None = SPEC) -> VQARecord:
    return VQARecord(id=f"q-{question.name}", image="x.png", question=question.phrasings[0],
                     options=dict(zip("ABCD", question.classes)), answer=answer, subset=question.name,
                     extra={"spec": spec} if spec else {})


def test_doctests():
    import doctest

    assert doctest.testmod(truth).failed == 0


@pytest.mark.parametrize(
    ("chain", "subset", "expected"),
    [
        # grade needs size and density. medium (true), not enlarged (true) -> +1; very dense (true) -> +1
        ("The nuclei are medium, so not enlarged, and very dense, so crowded.", "grade", 1.0),
        # size only: +1 for size, 0 for the unnamed density, over 2 needed features
        ("The nuclei are medium, so not enlarged.", "grade", 0.5),
        # size: "large" false, "enlarged" false -> -1; density: "crowded" true -> +1; (-1 + 1) / 2
        ("The nuclei are large, so enlarged, and crowded.", "grade", 0.0),
        # size: one true (medium) one false (enlarged) -> 0; density: sparse false -> -1; -1 / 2
        ("The nuclei are medium. The nuclei are enlarged. The nuclei are sparse.", "grade", -0.5),
        # everything false: size -1, density -1 -> -1
        ("The nuclei are very large, so enlarged, and sparse, so not crowded.", "grade", -1.0),
        # density question: one true density claim; a true size claim earns nothing (not needed)
        ("About thirty nuclei crowd the tile. The nuclei are medium.", "nuclear_density", 1.0),
        # ... a false size claim costs: 1 + min(0, -1)
        ("About thirty nuclei crowd the tile. The nuclei are very large.", "nuclear_density", 0.0),
        # stain: pale blue background (true: IHC) and "most nuclei are brown" (false: partly) -> 0
        ("The background is pale blue and most nuclei are brown.", "stain", 0.0),
        # a repeated true claim weighs as much as one
        (" ".join(["About thirty nuclei crowd the tile."] * 10), "nuclear_density", 1.0),
    ],
)
def test_hand_worked_values(chain: str, subset: str, expected: float):
    assert truth_score(f"<think>{chain}</think><answer>A) x</answer>", TRUTH, subset) == pytest.approx(expected)


@pytest.mark.parametrize("question", QUESTION_TYPES, ids=lambda q: q.name)
def test_no_master_key_gets_credit(question):
    record = _record(question)
    for name, reply in master_key_replies(record).items():
        assert truth_reward(reply, record) == 0.0, name
        assert TruthProcessReward().score_text(reply, record) == 0.0, name


@pytest.mark.parametrize("question", QUESTION_TYPES, ids=lambda q: q.name)
def test_an_answer_option_by_itself_earns_nothing(question):
    record = _record(question)
    for letter, text in record.options.items():
        for reply in (f"<answer>{letter}) {text}</answer>", f"<think>{text}</think><answer>{letter}) {text}</answer>",
                      f"<think>{text}.</think>", f"<think>So the answer is {text}.</think><answer>{letter}) {text}</answer>",
                      f"The nuclei are {text}."):  # no <think>: nothing is read
            assert truth_reward(reply, record) == 0.0, reply


@pytest.mark.parametrize("question", QUESTION_TYPES, ids=lambda q: q.name)
def test_every_concluded_and_ruled_out_option_gets_the_same_score(question):
    """One fixed description of the tile; the options it rules out and the one it concludes vary."""
    record = _record(question)
    options = record.options
    scores = set()
    for concluded in options:
        for ruled_1, ruled_2 in combinations([letter for letter in options if letter != concluded], 2):
            chain = (f"<think>The nuclei are medium, so not enlarged, and about thirty nuclei crowd the tile. "
                     f"{options[ruled_1]} is ruled out, and {options[ruled_2]} is unlikely, so the answer is "
                     f"{options[concluded]}.</think><answer>{concluded}) {options[concluded]}</answer>")
            scores.add(truth_reward(chain, record))
    assert len(scores) == 1, scores


def test_a_record_without_a_tile_spec_is_a_clear_error():
    record = _record(QUESTION_TYPES[-1], spec=None)
    with pytest.raises(ValueError, match=r"record 'q-grade' has no tile spec"):
        truth_reward("<think>The nuclei are medium.</think>", record)


def test_callback_weight_and_name():
    callback = TruthProcessReward(weight=0.5)
    assert callback.name == "truth" and callback.weight == 0.5
    record = _record(QUESTION_TYPES[-1])
    assert callback.score_text("<think>The nuclei are medium, so not enlarged.</think>", record) == 0.5
