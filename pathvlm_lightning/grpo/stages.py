"""The typed, frozen stages one GRPO step's data moves through.

B prompts, G completions each; completion ``i`` belongs to prompt ``i // G``. One step, in order:

1. the rollout callback samples -> :class:`Samples` (ids, the completion mask, each completion
   decoded and parsed once: :mod:`pathvlm_lightning.rewards.completion`);
2. every reward's ``begin`` (a judge starts its requests);
3. :meth:`Samples.micro_batches` cuts the slices once (:class:`MicroBatch`, whole groups, image
   data cut by :func:`select_prompts`), shared by the reference and the policy passes;
4. the reference pass over those slices (only when the loss has a KL term);
5. every reward's ``score`` -> one [B*G] tensor each;
6. the module -> :class:`Scored` (per-reward scores, weighted total, advantages, reference log-probs);
7. the policy passes over the same slices.

Each stage is built by its owner in one expression and never changed afterwards: the dataclasses
are frozen (assigning a field raises), and restricting a stage to some groups
(:meth:`Samples.select_groups`, :meth:`Scored.select_groups`) returns a new one, cut field by field
by each field's declared rows (per prompt or per completion), never by a hand-written list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from pathvlm_lightning.backbone.sequences import pick_images
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.completion import ParsedCompletion, parse_completions

# How a field's rows are cut when a stage is restricted to some groups (``field(metadata=...)``).
_PROMPTS = {"rows": "prompts"}  # one row per prompt: [B, ...] tensors, tuples of B
_PROMPT_INPUTS = {"rows": "prompt_inputs"}  # the processor's output: cut by select_prompts
_COMPLETIONS = {"rows": "completions"}  # one row per completion: [B*G, ...] tensors, tuples of B*G
_STAGE = {"rows": "stage"}  # a nested stage, restricted the same way


@dataclass(frozen=True, eq=False)
class Samples:
    """The sampled completions of one step (built by the rollout callback)."""

    records: tuple[VQARecord, ...] = field(metadata=_PROMPTS)  # B, one per prompt
    prompt_inputs: Mapping[str, torch.Tensor] = field(metadata=_PROMPT_INPUTS)  # processor output, left padded
    completion_ids: torch.Tensor = field(metadata=_COMPLETIONS)  # [B*G, L] long, padded after the first EOS
    completion_mask: torch.Tensor = field(metadata=_COMPLETIONS)  # [B*G, L] 1 up to and including the first EOS
    truncated: torch.Tensor = field(metadata=_COMPLETIONS)  # [B*G] bool, True when no EOS within max_new_tokens
    parsed: tuple[ParsedCompletion, ...] = field(metadata=_COMPLETIONS)  # B*G, each completion read once
    group_size: int  # G
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same one
    generation_seconds: float = 0.0
    sampler_logprobs: torch.Tensor | None = field(default=None, metadata=_COMPLETIONS)
    """[B*G, L] float32 log-prob of each completion token at ``temperature`` as the sampler drew it
    (``Backbone.generate_with_logprobs``; 0 after the first EOS). Compared with the trainer's log-probs
    of the same weights, it gives ``rollout/sampler_kl`` (:func:`sampler_kl_terms`)."""

    def __post_init__(self) -> None:
        rows = len(self.records) * self.group_size
        sizes = {"completion_ids": self.completion_ids.shape[0], "completion_mask": self.completion_mask.shape[0],
                 "truncated": self.truncated.shape[0], "parsed": len(self.parsed)}
        wrong = {name: size for name, size in sizes.items() if size != rows}
        if wrong:
            raise ValueError(f"Samples: {len(self.records)} prompts x G={self.group_size} need {rows} rows, got {wrong}")

    @classmethod
    def of(
        cls,
        records: Sequence[VQARecord],
        prompt_inputs: Mapping[str, torch.Tensor],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        truncated: torch.Tensor,
        texts: Sequence[str],
        group_size: int,
        **rest: Any,
    ) -> Samples:
        """The stage for decoded ``texts``, each parsed here, once, against its record's options."""
        records = tuple(records)
        return cls(
            records=records,
            prompt_inputs=prompt_inputs,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            truncated=truncated,
            parsed=parse_completions(texts, [r.options for r in records], group_size),
            group_size=group_size,
            **rest,
        )

    @property
    def num_prompts(self) -> int:
        return len(self.records)

    @property
    def num_completions(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_texts(self) -> tuple[str, ...]:
        """B*G decoded completions (special tokens removed)."""
        return tuple(p.text for p in self.parsed)

    def record_of(self, i: int) -> VQARecord:
        """The record that completion ``i`` answers."""
        return self.records[i // self.group_size]

    def select_groups(self, keep: torch.Tensor) -> Samples:
        """These samples restricted to the prompts where ``keep`` [B] is True (with all G completions)."""
        return _select_groups(self, keep, self.num_prompts, self.group_size)

    def micro_batches(self, completions_per_slice: int | None) -> tuple[MicroBatch, ...]:
        """The passes' slices: consecutive whole groups, ``completions_per_slice`` completions each
        (a multiple of G; the last slice may hold fewer); one slice of everything when None or when
        everything fits in one. Cut once per step; the reference and the policy read the same ones."""
        n = self.num_completions
        if completions_per_slice is None or completions_per_slice >= n:
            return (self._micro_batch(0, self.num_prompts, self.prompt_inputs),)
        if completions_per_slice < 1 or completions_per_slice % self.group_size:
            raise ValueError(
                f"micro_batches: {completions_per_slice!r} completions per slice is not a positive multiple "
                f"of the group size {self.group_size}"
            )
        groups = completions_per_slice // self.group_size
        slices = []
        for start in range(0, self.num_prompts, groups):
            keep = torch.zeros(self.num_prompts, dtype=torch.bool)
            keep[start : start + groups] = True
            stop = min(start + groups, self.num_prompts)
            slices.append(self._micro_batch(start, stop, select_prompts(self.prompt_inputs, keep)))
        return tuple(slices)

    def _micro_batch(self, first: int, stop: int, prompt_inputs: Mapping[str, torch.Tensor]) -> MicroBatch:
        rows = slice(first * self.group_size, stop * self.group_size)
        return MicroBatch(
            rows=rows,
            prompt_inputs=prompt_inputs,
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[rows],
            group_size=self.group_size,
            temperature=self.temperature,
        )


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One log-prob pass's slice of whole groups: completions ``rows`` of the step."""

    rows: slice  # the completions of the step this slice holds, [start, stop)
    prompt_inputs: Mapping[str, torch.Tensor]  # the slice's prompts (their images cut by select_prompts)
    completion_ids: torch.Tensor  # [n, L]
    completion_mask: torch.Tensor  # [n, L]
    sampler_logprobs: torch.Tensor | None  # [n, L]
    group_size: int
    temperature: float


@dataclass(frozen=True, eq=False)
class Scored:
    """The scored completions of one step (built by the module once every reward has scored)."""

    samples: Samples = field(metadata=_STAGE)
    scores: Mapping[str, torch.Tensor] = field(metadata=_COMPLETIONS)  # reward name -> [B*G] unweighted, NaN = abstain
    rewards: Mapping[str, torch.Tensor] = field(metadata=_COMPLETIONS)  # reward name -> [B*G] weighted
    total: torch.Tensor = field(metadata=_COMPLETIONS)  # [B*G] sum of the weighted rewards (:func:`total_reward`)
    advantages: torch.Tensor = field(metadata=_COMPLETIONS)  # [B*G]
    ref_logprobs: torch.Tensor | None = field(default=None, metadata=_COMPLETIONS)  # [B*G, L] reference model

    def __post_init__(self) -> None:  # read-only views: a frozen stage's dicts cannot be changed either
        object.__setattr__(self, "scores", MappingProxyType(dict(self.scores)))
        object.__setattr__(self, "rewards", MappingProxyType(dict(self.rewards)))

    def select_groups(self, keep: torch.Tensor) -> Scored:
        """This stage restricted to the prompts where ``keep`` [B] is True (dynamic sampling drops the
        groups whose rewards are all equal)."""
        return _select_groups(self, keep, self.samples.num_prompts, self.samples.group_size)


def total_reward(rewards: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B*G] sum of the weighted rewards; a completion all rewards abstain on is NaN."""
    stacked = torch.stack(list(rewards.values()))  # [R, B*G]
    total = torch.nansum(stacked, dim=0)
    return torch.where(torch.isnan(stacked).all(dim=0), torch.nan, total)


def _select_groups(stage: Any, keep: torch.Tensor, num_prompts: int, group_size: int) -> Any:
    """``stage`` with every field that has rows cut to the kept prompts (their G completions each)."""
    keep = keep.bool().cpu()
    if keep.shape != (num_prompts,):
        raise ValueError(f"select_groups: keep must have shape [{num_prompts}], got {tuple(keep.shape)}")
    rows = keep.repeat_interleave(group_size)  # [B*G]
    changes = {}
    for f in fields(stage):
        kind = f.metadata.get("rows")
        value = getattr(stage, f.name)
        if kind == "stage":
            changes[f.name] = value.select_groups(keep)
        elif kind == "prompt_inputs":
            changes[f.name] = select_prompts(value, keep)
        elif kind is not None:
            changes[f.name] = _take(value, keep if kind == "prompts" else rows)
    return replace(stage, **changes)


def _take(value: Any, rows: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, Mapping):
        return {name: _take(v, rows) for name, v in value.items()}
    return tuple(v for v, k in zip(value, rows.tolist()) if k)


def select_prompts(prompt_inputs: Mapping[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Processor outputs for the prompts where ``keep`` [B] is True (one image per prompt), their
    images cut by :func:`~pathvlm_lightning.backbone.sequences.pick_images`."""
    out = {
        key: value[keep.to(value.device)]
        for key, value in prompt_inputs.items()
        if key not in ("pixel_values", "image_grid_thw")
    }
    grid = prompt_inputs.get("image_grid_thw")
    if grid is not None:
        if grid.shape[0] != keep.shape[0]:
            raise ValueError(f"select_prompts: expected one image per prompt, got {grid.shape[0]} images for {keep.shape[0]} prompts")
        out.update(pick_images(prompt_inputs, keep.nonzero().flatten().tolist()))
    return out


def sampler_kl_terms(
    sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over completion tokens of the k3 estimate of KL(sampler || trainer), number of tokens).

    All [N, L]: the sampled tokens' log-probs as the sampler drew them and as the trainer computes
    them (same weights, same temperature), and the completion mask. Per token, with
    ``d = logp_trainer - logp_sampler``, ``k3 = exp(d) - 1 - d``: non-negative, and its mean over tokens
    drawn from the sampler estimates KL(sampler || trainer) without the vocabulary (only the sampled
    token's log-prob is needed). Sum and count, so micro-batches and ranks add up before dividing.
    """
    diff = (trainer_logprobs.detach().double() - sampler_logprobs.double()).masked_fill(mask == 0, 0.0)  # [N, L]
    k3 = torch.expm1(diff) - diff  # [N, L] float64 (a difference of 1e-7 gives k3 = 5e-15), 0 where masked
    return k3.sum().float(), mask.sum().float()
