"""Turning lists of records into model inputs through the backbone's processor.

Two batch kinds: SFT batches hold the whole conversation with labels on the assistant reply only
(the model should learn to answer, not to predict the question or the image tokens); prompt
batches hold only the prompt, ready for ``generate`` (GRPO rollouts, evaluation).

SFT batches are padded on the right: the loss ignores padding through ``labels == -100`` and the
attention mask, and right padding keeps every reply starting where its prompt ends. Prompt batches
are padded on the left, so that generated tokens follow each prompt directly.

Where the reply starts is found, not assumed: the prompt rendered with the generation prompt must
be a token prefix of the full conversation (true for Qwen-style chat templates); a template that
breaks this raises instead of silently mis-masking. Records over ``max_length`` tokens raise or,
with ``on_invalid="skip"``, are left out of the batch and logged; nothing is truncated, since a
cut could fall inside the image tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pathvlm_lightning.data.counterfactual import VARIANT_KEY, blank_like
from pathvlm_lightning.data.images import load_image
from pathvlm_lightning.data.prompt import PROMPT_TEMPLATE, build_prompt_messages, sft_target
from pathvlm_lightning.data.records import BatchRecords, VQARecord
from pathvlm_lightning.data.validation import DataValidationError, InvalidRecord, RecordPolicy

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


class _ProcessorCollator:
    """Shared parts: the processor, the prompt template, and the policy for over-long records."""

    def __init__(self, processor: Any, limit: int | None, on_invalid: str, template: str, name: str) -> None:
        if processor is None:
            raise ValueError(f"{name} needs a processor (the backbone's), got None")
        if limit is not None and limit <= 0:
            raise ValueError(f"{name}: the length limit must be positive or None, got {limit!r}")
        self.processor = processor
        self.limit = limit
        self.template = template
        self.policy = RecordPolicy(name, on_invalid)

    def prompt_text(self, record: VQARecord) -> str:
        with_image = record.extra.get(VARIANT_KEY) != "no_image"
        return self.processor.apply_chat_template(
            build_prompt_messages(record, self.template, with_image=with_image), tokenize=False, add_generation_prompt=True
        )

    def encode(self, texts: list[str], records: list[VQARecord], padding_side: str) -> dict[str, torch.Tensor]:
        """The processor's batch; a record's counterfactual (``extra["counterfactual"]``, see
        ``data/counterfactual.py``) blanks its image or leaves it out."""
        variants = {record.extra.get(VARIANT_KEY) for record in records}
        if "no_image" in variants and len(variants) > 1:
            raise ValueError(f"{self.policy.report.source}: a batch mixes image-free and image records")
        images = None
        if variants != {"no_image"}:
            images = [load_image(record.image) for record in records]
            images = [blank_like(im) if r.extra.get(VARIANT_KEY) == "blank" else im for r, im in zip(records, images)]
        try:
            encoded = self.processor(
                text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side
            )
        except ValueError as err:  # validation should have caught it; still name the records
            raise DataValidationError(
                f"{self.policy.report.source}: the processor refused the batch of records "
                f"{[r.id for r in records]}: {err}",
                "processor_error",
            ) from err
        return dict(encoded)

    def too_long(self, records: list[VQARecord], lengths: torch.Tensor, what: str) -> list[int]:
        """Indices of the records within the limit; over-long ones raise or are logged as skipped."""
        kept = []
        for index, (record, length) in enumerate(zip(records, lengths.tolist())):
            if self.limit is not None and length > self.limit:
                problem = InvalidRecord("too_long", f"is {length} tokens long, over {what} {self.limit}")
                self.policy.handle(problem, record.id, None)
            else:
                kept.append(index)
        if not kept:
            raise DataValidationError(
                f"{self.policy.report.source}: every record of the batch {[r.id for r in records]} is over "
                f"{what} {self.limit}",
                "too_long",
            )
        return kept


class SFTCollator(_ProcessorCollator):
    """Records -> a right-padded SFT batch with labels on the assistant reply and its end-of-turn token.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]``, the processor's image
    tensors (``pixel_values`` ``[sum of patches, D]``, ``image_grid_thw`` ``[B, 3]``, and any other
    key it returns, e.g. ``mm_token_type_ids``), and ``records`` (a :class:`BatchRecords`, which
    Lightning's device moves and precision casts pass through untouched). ``target_fn`` writes the reply
    (default :func:`sft_target`; e.g. a demonstration with letter noise for the synthetic set).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        on_invalid: str = "error",
        template: str = PROMPT_TEMPLATE,
        end_token: str = END_OF_TURN,
        name: str = "SFTCollator",
        target_fn: Callable[[VQARecord], str] = sft_target,
    ) -> None:
        super().__init__(processor, max_length, on_invalid, template, name)
        self.target_fn = target_fn
        self.end_token = end_token
        self.end_id = processor.tokenizer.convert_tokens_to_ids(end_token)
        if self.end_id is None or self.end_id == processor.tokenizer.unk_token_id:
            raise ValueError(f"{name}: end_token {end_token!r} is not a token of the processor's tokenizer")

    def __call__(self, records: Sequence[VQARecord]) -> dict[str, Any]:
        records = list(records)
        prompts = [self.prompt_text(record) for record in records]
        conversations = [self._conversation_text(record, prompt) for record, prompt in zip(records, prompts)]
        batch = self.encode(conversations, records, padding_side="right")
        lengths = batch["attention_mask"].sum(dim=1)  # [B]
        kept = self.too_long(records, lengths, "max_length")
        if len(kept) < len(records):
            return self([records[i] for i in kept])
        prompt_batch = self.encode(prompts, records, padding_side="right")
        prompt_lengths = prompt_batch["attention_mask"].sum(dim=1)  # [B]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # [B, T]
        for i, record in enumerate(records):
            start, stop = self._reply_span(
                batch["input_ids"][i, : lengths[i]], prompt_batch["input_ids"][i, : prompt_lengths[i]], record
            )
            labels[i, start:stop] = batch["input_ids"][i, start:stop]
        return {**batch, "labels": labels, "records": BatchRecords(records)}

    def _conversation_text(self, record: VQARecord, prompt: str) -> str:
        target = self.target_fn(record)
        messages = build_prompt_messages(record, self.template) + [
            {"role": "assistant", "content": [{"type": "text", "text": target}]}
        ]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if not text.startswith(prompt) or not text[len(prompt) :].startswith(target + self.end_token):
            raise ValueError(
                f"record {record.id!r}: the chat template does not render the conversation as the prompt "
                f"followed by the reply and {self.end_token!r}; got {text[max(0, len(prompt) - 40) :]!r}"
            )
        return text

    def _reply_span(self, ids: torch.Tensor, prompt_ids: torch.Tensor, record: VQARecord) -> tuple[int, int]:
        """[start, stop) of the reply tokens + the first end-of-turn token after them, in ``ids``."""
        start = len(prompt_ids)
        if not torch.equal(ids[:start], prompt_ids):
            raise ValueError(
                f"record {record.id!r}: the tokenised prompt is not a prefix of the tokenised conversation, "
                "so the assistant reply cannot be located (tokens merge across the boundary)"
            )
        ends = (ids[start:] == self.end_id).nonzero()
        if len(ends) == 0:
            raise ValueError(f"record {record.id!r}: no {self.end_token!r} token after the reply")
        return start, start + int(ends[0]) + 1


class PromptCollator(_ProcessorCollator):
    """Records -> ``{"prompt_inputs": left-padded processor output, "records": BatchRecords}`` for generation."""

    def __init__(
        self,
        processor: Any,
        max_prompt_length: int | None = None,
        on_invalid: str = "error",
        template: str = PROMPT_TEMPLATE,
        name: str = "PromptCollator",
    ) -> None:
        super().__init__(processor, max_prompt_length, on_invalid, template, name)

    def __call__(self, records: Sequence[VQARecord]) -> dict[str, Any]:
        records = list(records)
        inputs = self.encode([self.prompt_text(record) for record in records], records, padding_side="left")
        kept = self.too_long(records, inputs["attention_mask"].sum(dim=1), "max_prompt_length")
        if len(kept) < len(records):
            return self([records[i] for i in kept])
        return {"prompt_inputs": inputs, "records": BatchRecords(records)}
