"""Prompt and SFT target: the exact text every stage shows and teaches."""

from __future__ import annotations

from pathvlm_lightning.data.prompt import PROMPT_TEMPLATE, build_prompt_messages, build_prompt, format_options, sft_target
from pathvlm_lightning.data.records import VQARecord

RECORD = VQARecord(
    id="r1",
    image="/tmp/x.png",
    question="How large are the nuclei?",
    options={"A": "small", "B": "large", "C": "very large"},
    answer="C",
    explanation="They span most of the cell.",
)


def test_prompt_lists_question_then_options_then_format():
    prompt = build_prompt(RECORD)
    assert prompt.startswith("How large are the nuclei?\nOptions:\nA) small\nB) large\nC) very large\n\n")
    assert "<think>" in prompt and "</think>" in prompt and "<answer>" in prompt and "</answer>" in prompt
    assert prompt == PROMPT_TEMPLATE.format(question=RECORD.question, options="A) small\nB) large\nC) very large")


def test_custom_template():
    assert build_prompt(RECORD, template="Q: {question} | {options}") == (
        "Q: How large are the nuclei? | A) small\nB) large\nC) very large"
    )


def test_messages_put_the_image_before_the_text():
    assert build_prompt_messages(RECORD) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(RECORD)}]}
    ]


def test_sft_target_exact():
    assert sft_target(RECORD) == "<think>They span most of the cell.</think><answer>C) very large</answer>"


def test_format_options_keeps_given_letters():
    assert format_options({"A": "x", "C": "z"}) == "A) x\nC) z"
