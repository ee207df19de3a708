"""The typed container that carries one GRPO rollout through the step.

B prompts, G completions each; completion ``i`` belongs to prompt ``i // G``.
Filled in order: the rollout callback sets the generation fields, reward callbacks add to
``rewards``, the module sets ``advantages``, the reference callback sets ``ref_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pathvlm_lightning.data.records import VQARecord


@dataclass
class Rollout:
    records: list[VQARecord]  # B, one per prompt
    prompt_inputs: dict[str, torch.Tensor]  # processor output for the B prompts (left padded)
    completion_ids: torch.Tensor  # [B*G, L] long, padded after the first EOS
    completion_mask: torch.Tensor  # [B*G, L] 1 up to and including the first EOS
    completion_texts: list[str]  # B*G decoded completions (special tokens removed)
    truncated: torch.Tensor  # [B*G] bool, True when no EOS within max_new_tokens
    group_size: int  # G
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same one
    generation_seconds: float = 0.0
    sampler_logprobs: torch.Tensor | None = None
    """[B*G, L] float32 log-prob of each completion token at ``temperature`` as the sampler drew it
    (``Backbone.generate_with_logprobs``; 0 after the first EOS). Compared with the trainer's log-probs
    of the same weights, it gives ``rollout/sampler_kl`` (:func:`sampler_kl_terms`)."""
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B*G], weighted, NaN = abstain
    advantages: torch.Tensor | None = None  # [B*G]
    old_logprobs: torch.Tensor | None = None  # [B*G, L] policy at sampling time (num_iterations > 1)
    ref_logprobs: torch.Tensor | None = None  # [B*G, L] reference model
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return len(self.records)

    @property
    def num_completions(self) -> int:
        return self.completion_ids.shape[0]

    def record_of(self, i: int) -> VQARecord:
        """The record that completion ``i`` answers."""
        return self.records[i // self.group_size]

    def total_reward(self) -> torch.Tensor:
        """[B*G] sum of the weighted rewards; a completion all rewards abstain on is NaN."""
        stacked = torch.stack(list(self.rewards.values()))  # [R, B*G]
        total = torch.nansum(stacked, dim=0)
        return torch.where(torch.isnan(stacked).all(dim=0), torch.nan, total)

    def select_groups(self, keep: torch.Tensor) -> Rollout:
        """The rollout restricted to the prompts where ``keep`` [B] is True (with all G completions).

        Used to drop groups whose rewards are all equal (dynamic sampling). Assumes one image per
        prompt, as every record here has.
        """
        keep = keep.bool().cpu()
        if keep.shape != (self.num_prompts,):
            raise ValueError(f"select_groups: keep must have shape [{self.num_prompts}], got {tuple(keep.shape)}")
        prompts = keep.nonzero().flatten()  # [B']
        rows = keep.repeat_interleave(self.group_size)  # [B*G]

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return Rollout(
            records=[self.records[i] for i in prompts.tolist()],
            prompt_inputs=select_prompts(self.prompt_inputs, keep),
            completion_ids=take(self.completion_ids),
            completion_mask=take(self.completion_mask),
            completion_texts=[t for t, k in zip(self.completion_texts, rows.tolist()) if k],
            truncated=take(self.truncated),
            group_size=self.group_size,
            temperature=self.temperature,
            generation_seconds=self.generation_seconds,
            sampler_logprobs=take(self.sampler_logprobs),
            rewards={name: take(r) for name, r in self.rewards.items()},
            advantages=take(self.advantages),
            old_logprobs=take(self.old_logprobs),
            ref_logprobs=take(self.ref_logprobs),
            extras=dict(self.extras),
        )


    def group_slices(self, completions_per_slice: int | None) -> list[Rollout]:
        """The rollout cut into consecutive slices of whole groups, ``completions_per_slice``
        completions each (a multiple of G; the last slice may hold fewer); ``[self]`` when None or
        when everything fits in one slice. Slices share no tensors with each other's rows."""
        if completions_per_slice is None or completions_per_slice >= self.num_completions:
            return [self]
        if completions_per_slice < 1 or completions_per_slice % self.group_size:
            raise ValueError(
                f"group_slices: {completions_per_slice!r} completions per slice is not a positive multiple "
                f"of the group size {self.group_size}"
            )
        groups = completions_per_slice // self.group_size
        slices = []
        for start in range(0, self.num_prompts, groups):
            keep = torch.zeros(self.num_prompts, dtype=torch.bool)
            keep[start : start + groups] = True
            slices.append(self.select_groups(keep))
        return slices


def select_prompts(prompt_inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Processor outputs for the prompts where ``keep`` [B] is True.

    ``pixel_values`` holds every image's patches back to back (``[sum t*h*w, C*P*P]``), so it is cut by
    the patch counts of ``image_grid_thw`` ([num_images, 3], one image per prompt).
    """
    grid = prompt_inputs.get("image_grid_thw")
    out: dict[str, torch.Tensor] = {}
    for key, value in prompt_inputs.items():
        if key in ("pixel_values", "image_grid_thw"):
            continue
        out[key] = value[keep.to(value.device)]
    if grid is not None:
        if grid.shape[0] != keep.shape[0]:
            raise ValueError(f"select_prompts: expected one image per prompt, got {grid.shape[0]} images for {keep.shape[0]} prompts")
        counts = grid.prod(dim=-1).tolist()  # patches per image
        blocks = torch.split(prompt_inputs["pixel_values"], counts)
        out["pixel_values"] = torch.cat([b for b, k in zip(blocks, keep.tolist()) if k])
        out["image_grid_thw"] = grid[keep.to(grid.device)]
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
