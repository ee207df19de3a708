"""The rollout's sampler: G completions per prompt, returned as the step's first stage (:class:`Samples`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.decoding import decode_completions
from pathvlm_lightning.callbacks.settings import RecordsArguments
from pathvlm_lightning.grpo.stages import Samples


class RolloutCallback(RecordsArguments, Callback):
    """Generates ``num_generations`` completions for every prompt of a batch in one batched call.

    A part of ``GRPOModule`` (``model.init_args.rollout``): the module reads ``num_generations`` and
    ``max_new_tokens`` from it and calls :meth:`generate` with its policy at the start of each
    training step; the step then runs every reward's ``begin``, the reference pass, every reward's
    ``score`` and the advantages, in that order, by the module, never by hook order
    (``grpo/stages.py``). Each completion is decoded and parsed once here (``Samples.parsed``); every
    reward reads that parse. Generation goes through ``Backbone.generate_with_logprobs``: each prompt is pre-filled once for its
    G completions, vision special tokens are never sampled, and the log-prob of every sampled token is
    kept (``Samples.sampler_logprobs``) for ``rollout/sampler_kl``.

    Args:
        num_generations: G, completions per prompt (the paper uses 4).
        max_new_tokens: completion budget; a completion without EOS within it is flagged truncated.
        temperature: sampling temperature; the policy's log-probs are computed at the same temperature.
        top_p: nucleus sampling.
        min_new_tokens: force at least this many tokens (benchmarks force equal lengths with it).

    State: the torch RNG state at checkpoint time, so a resumed run samples the same completions as an
    uninterrupted one.
    """

    def __init__(
        self,
        num_generations: int = 4,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
    ) -> None:
        if num_generations < 2:
            raise ValueError(f"RolloutCallback: num_generations must be >= 2 for group advantages, got {num_generations!r}")
        if max_new_tokens < 1:
            raise ValueError(f"RolloutCallback: max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"RolloutCallback: temperature must be > 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"RolloutCallback: top_p must be in (0, 1], got {top_p!r}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"RolloutCallback: min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens!r}")
        self.num_generations = num_generations
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.min_new_tokens = min_new_tokens

    @torch.no_grad()
    def generate(self, backbone: Backbone, batch: dict) -> Samples:
        """G completions of every prompt of ``batch`` sampled from the policy ``backbone``."""
        start = time.perf_counter()
        generated = backbone.generate_with_logprobs(
            batch["prompt_inputs"],
            num_generations=self.num_generations,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=True,
            min_new_tokens=self.min_new_tokens,
        )  # ids and sampler log-probs [B*G, L]
        seconds = time.perf_counter() - start
        completion_ids = generated.ids
        mask, truncated = backbone.completion_mask(completion_ids)  # [B*G, L], [B*G]
        return Samples.of(
            records=batch["records"],
            prompt_inputs=batch["prompt_inputs"],
            completion_ids=completion_ids,
            completion_mask=mask,
            truncated=truncated,
            texts=decode_completions(backbone.processor, completion_ids, mask),
            group_size=self.num_generations,
            temperature=self.temperature,
            generation_seconds=seconds,
            sampler_logprobs=generated.logprobs,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])
