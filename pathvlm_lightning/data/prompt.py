"""The prompt every stage shows the model, and the SFT target it learns to write.

SFT, GRPO and evaluation must use one wording and one answer format, or the rewards and the
answer extraction would judge text the model was never taught to produce. The format is the
paper's: reasoning inside ``<think></think>``, then ``<answer>B) option text</answer>`` with both
the letter and the option text (the accuracy reward checks both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pathvlm_lightning.data.records import VQARecord

PROMPT_TEMPLATE = (
    "{question}\n"
    "Options:\n"
    "{options}\n\n"
    "Study the image and reason step by step between <think> and </think>: describe what you see "
    "and rule out the options that do not fit. Then write your final choice between <answer> and "
    "</answer> as the option letter, a closing parenthesis and the option text, "
    "like <answer>X) text of option X</answer>."
)


def format_options(options: Mapping[str, str]) -> str:
    """One ``A) text`` line per option, in letter order.

    >>> format_options({"A": "Necrosis", "B": "Fibrosis"})
    'A) Necrosis\\nB) Fibrosis'
    """
    return "\n".join(f"{letter}) {text}" for letter, text in options.items())


def build_prompt(record: VQARecord, template: str = PROMPT_TEMPLATE) -> str:
    """The user's text for ``record``; ``template`` has ``{question}`` and ``{options}`` slots."""
    return template.format(question=record.question, options=format_options(record.options))


def build_prompt_messages(record: VQARecord, template: str = PROMPT_TEMPLATE, with_image: bool = True) -> list[dict[str, Any]]:
    """The chat for ``record``: one user turn holding the image, then the prompt text. Without the
    image (``with_image=False``: the image-free counterfactual) the turn holds the text alone."""
    image = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*image, {"type": "text", "text": build_prompt(record, template)}]}]


def sft_target(record: VQARecord) -> str:
    """What the model should answer during SFT: ``<think>{explanation}</think><answer>B) text</answer>``,
    or the record's own teacher demonstration when it carries one (see ``VQARecord.demonstration``)."""
    return record.demonstration
