"""Collation through the tiny Qwen processor: label masking by hand, padding sides, length limits."""

from __future__ import annotations

import logging

import pytest
import torch

from pathvlm_lightning.data.collate import IGNORE_INDEX, PromptCollator, SFTCollator
from pathvlm_lightning.data.validation import DataValidationError
from tests.test_data_support import make_image, record

SHORT = "{question}"  # a one-line prompt, so the whole sequence can be written out below


@pytest.fixture
def image(tmp_path):
    return str(make_image(tmp_path / "tile.png", size=(56, 56)))  # 56x56 -> 4x4 patches -> 4 image tokens


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def test_sft_labels_cover_only_the_reply_and_its_end_token(tiny_processor, image):
    batch = SFTCollator(tiny_processor, template=SHORT)([record("r1", image)])
    tokens = _tokens(tiny_processor, batch["input_ids"][0].tolist())
    # prompt: ChatML user turn with the image, then the generation prompt; tokens of the tiny BPE
    prompt = ["<|im_start|>", "us", "er", "Ċ", "<|vision_start|>", *["<|image_pad|>"] * 4, "<|vision_end|>",
              "H", "ow", "Ġlarge", "?", "<|im_end|>", "Ċ", "<|im_start|>", "as", "sis", "t", "ant", "Ċ"]
    # reply: "<think>Dark nuclei.</think><answer>B) large</answer>" + end of turn
    reply = ["<think>", "D", "ark", "Ġnuclei", ".", "</think>", "<answer>", "B", ")", "Ġlarge", "</answer>",
             "<|im_end|>"]
    assert tokens == prompt + reply + ["Ċ"]  # the template's newline after <|im_end|> is not learned
    labels = batch["labels"][0].tolist()
    expected = [None] * len(prompt) + reply + [None]
    assert [None if label == IGNORE_INDEX else _tokens(tiny_processor, [label])[0] for label in labels] == expected
    assert batch["attention_mask"].tolist() == [[1] * len(tokens)]
    assert batch["pixel_values"].shape == (16, 1176)  # 4x4 patches of 3*2*14*14 values
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert [r.id for r in batch["records"]] == ["r1"]


def test_sft_batch_is_right_padded_with_masked_padding(tiny_processor, tmp_path, image):
    long = record("long", image, explanation="The nuclei are large and dark, so the nuclei are large.")
    short = record("short", str(make_image(tmp_path / "big.png", size=(112, 112))))  # 16 image tokens
    batch = SFTCollator(tiny_processor)([long, short])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    width = batch["input_ids"].shape[1]
    assert max(lengths) == width and min(lengths) < width
    pad = tiny_processor.tokenizer.pad_token_id
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert (batch["input_ids"][row, length:] == pad).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        learned = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        text = tiny_processor.tokenizer.decode(learned)
        assert text == f"<think>{batch['records'][row].explanation}</think><answer>B) large</answer><|im_end|>"
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert batch["pixel_values"].shape == (16 + 64, 1176)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_prompt_batch_is_left_padded_and_ends_with_the_generation_prompt(tiny_processor, tmp_path, image):
    records = [record("a", image), record("b", str(make_image(tmp_path / "big.png", size=(112, 112))))]
    batch = PromptCollator(tiny_processor)(records)
    inputs = batch["prompt_inputs"]
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert list(batch["records"]) == records
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the 4-token image prompt is 12 tokens shorter: padded on the left
    assert mask[0].sum() == mask[1].sum() - 12
    for row in range(2):
        assert _tokens(tiny_processor, inputs["input_ids"][row, -6:].tolist()) == [
            "<|im_start|>", "as", "sis", "t", "ant", "Ċ"
        ]


def _limit_between(tiny_processor, records) -> int:
    """A max_length the first record fits and the second (40 words longer) does not."""
    fits = SFTCollator(tiny_processor)(records[:1])["input_ids"].shape[1]
    assert SFTCollator(tiny_processor)(records[1:])["input_ids"].shape[1] > fits + 5
    return fits + 5


def test_too_long_raises_naming_the_record(tiny_processor, image):
    records = [record("fits", image), record("too-long", image, explanation="large " * 40)]
    limit = _limit_between(tiny_processor, records)
    with pytest.raises(DataValidationError, match=rf"record 'too-long': is \d+ tokens long, over max_length {limit}"):
        SFTCollator(tiny_processor, max_length=limit)(records)


def test_too_long_skipped_and_counted(tiny_processor, image, caplog):
    records = [record("fits", image), record("too-long", image, explanation="large " * 40)]
    collator = SFTCollator(tiny_processor, max_length=_limit_between(tiny_processor, records), on_invalid="skip")
    with caplog.at_level(logging.WARNING):
        batch = collator(records)
    assert [r.id for r in batch["records"]] == ["fits"]
    assert batch["input_ids"].shape[0] == 1
    assert dict(collator.policy.report.skipped) == {"too_long": 1}
    assert any("too-long" in message for message in caplog.messages)
    with pytest.raises(DataValidationError, match=r"every record of the batch \['too-long'\]"):
        collator(records[1:])


def test_prompt_length_limit(tiny_processor, image):
    # the 22 prompt tokens written out in test_sft_labels_cover_only_the_reply_and_its_end_token
    with pytest.raises(DataValidationError, match=r"record 'a': is 22 tokens long, over max_prompt_length 21"):
        PromptCollator(tiny_processor, max_prompt_length=21, template=SHORT)([record("a", image)])
    batch = PromptCollator(tiny_processor, max_prompt_length=22, template=SHORT)([record("a", image)])
    assert batch["prompt_inputs"]["input_ids"].shape == (1, 22)


class _TrailingSpaceTemplate:
    """A processor whose chat template ends the generation prompt with a space (BPE then merges it
    with the reply's first word, so the prompt's tokens are no prefix of the conversation's)."""

    def __init__(self, processor):
        self.inner = processor
        self.tokenizer = processor.tokenizer

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        if add_generation_prompt:
            return self.inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + " "
        prompt = self.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt + messages[-1]["content"][0]["text"] + "<|im_end|>\n"

    def __call__(self, **kwargs):
        return self.inner(**kwargs)


def test_reply_not_after_a_token_prefix_raises(tiny_processor, image):
    collator = SFTCollator(_TrailingSpaceTemplate(tiny_processor), target_fn=lambda r: f"nuclei {r.reference}")
    with pytest.raises(ValueError, match="record 'r1': the tokenised prompt is not a prefix"):
        collator([record("r1", image)])


class _ReasoningTemplate(_TrailingSpaceTemplate):
    """A template that opens ``<think>`` in the generation prompt but not in the stored reply."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        text = self.inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text + "<think>\n" if add_generation_prompt else text


def test_template_that_rewrites_the_reply_raises(tiny_processor, image):
    with pytest.raises(ValueError, match="record 'r1': the chat template does not render"):
        SFTCollator(_ReasoningTemplate(tiny_processor))([record("r1", image)])


def test_labels_match_the_tokens_they_label(tiny_processor, image):
    batch = SFTCollator(tiny_processor)([record("r1", image)])
    learned = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][learned], batch["input_ids"][learned])
