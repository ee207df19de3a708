"""The step's stages (``grpo/stages.py``): frozen, cut by declared rows, sliced once, each
completion parsed once (``rewards/completion.py``)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback, RubricProcessReward
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo import stages
from pathvlm_lightning.grpo.stages import Samples, Scored, total_reward
from pathvlm_lightning.rewards import answer, completion
from tests.test_grpo_module import G, grpo_fit, rollout_callback

OPTIONS = {"A": "Large", "B": "Small"}


def samples(texts: list[str], group_size: int = 2) -> Samples:
    """Samples of ``len(texts) / group_size`` prompts, each with one 2-patch image (patch values =
    the prompt's index) and sampler log-probs = the completion's index."""
    b, n = len(texts) // group_size, len(texts)
    records = [VQARecord(id=f"q{i}", image="x.png", question="Size?", options=OPTIONS, answer="A") for i in range(b)]
    prompt_inputs = {
        "input_ids": torch.arange(b)[:, None].repeat(1, 3),  # [B, 3]
        "attention_mask": torch.ones(b, 3, dtype=torch.long),
        "pixel_values": torch.arange(b, dtype=torch.float32).repeat_interleave(2)[:, None],  # [B*2, 1]
        "image_grid_thw": torch.tensor([[1, 1, 2]] * b),  # [B, 3]: 2 patches each
    }
    return Samples.of(
        records=records,
        prompt_inputs=prompt_inputs,
        completion_ids=torch.arange(n)[:, None].repeat(1, 4),  # [B*G, 4]
        completion_mask=torch.ones(n, 4, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        texts=texts,
        group_size=group_size,
        sampler_logprobs=torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4),
    )


TEXTS = [f"<think>t{i}</think><answer>{'AB'[i % 2]}) {OPTIONS['AB'[i % 2]]}</answer>" for i in range(6)]


def scored(s: Samples) -> Scored:
    rewards = {"r": torch.arange(s.num_completions, dtype=torch.float32)}
    return Scored(samples=s, scores=rewards, rewards=rewards, total=total_reward(rewards),
                  advantages=torch.zeros(s.num_completions), ref_logprobs=s.sampler_logprobs * 2)


def test_no_stage_field_can_be_assigned_after_construction() -> None:
    s = samples(TEXTS)
    step = scored(s)
    part = s.micro_batches(2)[0]
    for stage in (s, step, part, s.parsed[0]):
        for f in dataclasses.fields(stage):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(stage, f.name, getattr(stage, f.name))
    with pytest.raises(TypeError):  # the per-reward scores are a read-only view
        step.scores["r"] = torch.zeros(6)  # type: ignore[index]


def test_every_field_with_rows_declares_them() -> None:
    """A new per-prompt or per-completion field must say how it is cut, or select_groups would keep
    all its rows: only the scalars may go without."""
    for stage in (Samples, Scored):
        for f in dataclasses.fields(stage):
            assert "rows" in f.metadata or f.type in ("int", "float"), f"{stage.__name__}.{f.name}"


def test_select_groups_cuts_every_field_by_its_rows() -> None:
    s = samples(TEXTS)  # 3 prompts x 2
    kept = scored(s).select_groups(torch.tensor([True, False, True]))
    rows = [0, 1, 4, 5]
    assert [r.id for r in kept.samples.records] == ["q0", "q2"]
    assert kept.samples.completion_texts == tuple(TEXTS[i] for i in rows)
    assert kept.samples.completion_ids[:, 0].tolist() == rows
    assert kept.samples.sampler_logprobs[:, 0].tolist() == rows
    assert kept.ref_logprobs[:, 0].tolist() == [2 * r for r in rows]
    assert kept.scores["r"].tolist() == kept.total.tolist() == rows
    assert kept.samples.prompt_inputs["pixel_values"].flatten().tolist() == [0, 0, 2, 2]  # the images of q0, q2
    assert kept.samples.prompt_inputs["image_grid_thw"].shape == (2, 3)
    assert kept.samples.group_size == 2 and kept.samples.num_completions == 4
    with pytest.raises(ValueError, match=r"keep must have shape \[3\], got \(2,\)"):
        s.select_groups(torch.tensor([True, False]))


def test_micro_batches_are_consecutive_whole_groups() -> None:
    s = samples(TEXTS)
    parts = s.micro_batches(4)  # 2 groups, then 1
    assert [(p.rows.start, p.rows.stop) for p in parts] == [(0, 4), (4, 6)]
    assert [p.prompt_inputs["pixel_values"].flatten().tolist() for p in parts] == [[0, 0, 1, 1], [2, 2]]
    assert torch.equal(torch.cat([p.completion_ids for p in parts]), s.completion_ids)
    whole = s.micro_batches(None)
    assert len(whole) == 1 and whole[0].prompt_inputs is s.prompt_inputs and whole[0].rows == slice(0, 6)
    with pytest.raises(ValueError, match="3 completions per slice is not a positive multiple of the group size 2"):
        s.micro_batches(3)


def test_samples_refuse_rows_that_do_not_match() -> None:
    s = samples(TEXTS)
    with pytest.raises(ValueError, match=r"3 prompts x G=2 need 6 rows, got \{'parsed': 5\}"):
        dataclasses.replace(s, parsed=s.parsed[:5])


class _Counting:
    """A compiled pattern that counts its ``findall`` calls."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern, self.calls = pattern, 0

    def findall(self, text: str) -> list[Any]:
        self.calls += 1
        return self.pattern.findall(text)


def test_one_step_parses_each_completion_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Format, accuracy and the rubric all score one step, and the answer (and the reasoning) of
    each of its B*G completions is read exactly once."""
    answers = _Counting(answer._ANSWER_BLOCK)
    reasonings = _Counting(completion._THINK)
    monkeypatch.setattr(answer, "_ANSWER_BLOCK", answers)
    monkeypatch.setattr(completion, "_THINK", reasonings)
    callbacks = [rollout_callback(), FormatReward(), AccuracyReward(), RubricProcessReward()]
    _, trainer, memory, _ = grpo_fit(tmp_path, callbacks, max_steps=1, beta=0.0, skip_zero_advantage_steps=False)
    assert trainer.global_step == 1
    assert {"reward/format", "reward/accuracy", "reward/process"} <= memory.keys()
    completions = 2 * G  # batches hold 2 prompts
    assert answers.calls == completions
    assert reasonings.calls == completions


def test_reference_and_policy_share_the_slices_cut_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cuts: list[int] = []
    select_prompts = stages.select_prompts

    def counted(prompt_inputs: Any, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        cuts.append(int(keep.sum()))
        return select_prompts(prompt_inputs, keep)

    passes: list[tuple[int, bool]] = []  # (id of the prompt inputs, grad enabled) per log-prob pass
    token_logprobs = Backbone.token_logprobs

    def recorded(self: Backbone, prompt_inputs: Any, completion_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        assert kwargs["completion_mask"] is not None  # the rollout's own mask, not recomputed
        passes.append((id(prompt_inputs), torch.is_grad_enabled()))
        return token_logprobs(self, prompt_inputs, completion_ids, **kwargs)

    monkeypatch.setattr(stages, "select_prompts", counted)
    monkeypatch.setattr(Backbone, "token_logprobs", recorded)
    callbacks = [rollout_callback(), FormatReward(), ReferenceModelCallback()]
    grpo_fit(tmp_path, callbacks, max_steps=1, beta=0.04, micro_batch_size=G, skip_zero_advantage_steps=False)
    assert cuts == [1, 1]  # one cut per slice of one group, images included, for both passes
    reference, policy = [p for p in passes if not p[1]], [p for p in passes if p[1]]
    assert len(reference) == len(policy) == 2
    assert [i for i, _ in reference] == [i for i, _ in policy]  # the same slice objects

