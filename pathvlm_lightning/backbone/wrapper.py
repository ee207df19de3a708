"""The vision-language backbone every module and callback goes through (any family in ``families``).

``generate`` and ``token_logprobs`` are the two hot paths of GRPO; keeping all callers on them
means speedups (one vision pass and one prefill per group of G) land in one place.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from pathvlm_lightning.backbone import sharding
from pathvlm_lightning.backbone.decoding import Generated, decode
from pathvlm_lightning.backbone.export import export_pretrained
from pathvlm_lightning.backbone.families import Family, family_of
from pathvlm_lightning.backbone.loading import Quantization, Vocab, load_model_and_processor
from pathvlm_lightning.backbone.logprobs import (
    DEFAULT_CHUNK_SIZE,
    chunked_target_logprobs,
    final_hidden_states,
    output_layer,
)
from pathvlm_lightning.backbone.lora import LoraOptions, apply_lora
from pathvlm_lightning.backbone.prefix_group import grouped_hidden_states
from pathvlm_lightning.backbone.sampling import SamplingRule
from pathvlm_lightning.backbone.shared_prompt import (
    Sharing,
    SharingMode,
    cached_prompt_hidden_states,
    choose_sharing,
    expanded_image_features,
)
from pathvlm_lightning.backbone.sequences import (
    completion_mask as sequences_completion_mask,
    expand_prompt_inputs,
    mm_token_types,
    replace_tokens,
)


_log = logging.getLogger(__name__)

class Backbone(torch.nn.Module):
    """A Qwen-VL model of any supported family plus its processor, with LoRA, quantisation and freezing
    applied at construction; what differs between families is asked of ``self.family``.

    Args:
        model: ``embedded-tiny`` / ``embedded-small`` (offline random Qwen2.5-VL), an embedded twin of
            another family (``embedded-tiny-qwen2-vl``, ``embedded-tiny-qwen3-vl``,
            ``embedded-tiny-qwen3.5``), a folder or a hub id (family from its ``config.model_type``).
        vocab: the embedded models' tokenizer: ``small`` (1,024 ids, fast on CPU) or ``qwen``
            (the family's real tokenizer and vocabulary, built offline).
        seed: initialisation seed of the embedded models.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        freeze_vision: freeze the vision tower including the patch merger (the paper's setting).
        lora: adapters on the language model only; ``None`` trains the language model fully.
        quantization: bitsandbytes ``4bit`` (NF4) or ``8bit`` base weights; combine with ``lora``
            to train (quantised weights themselves take no gradient).
        gradient_checkpointing: recompute decoder activations in backward (non-reentrant).
        min_pixels, max_pixels: image resize bounds; tokens per image = pixels / (28 * 28).
        share_prompts: the G completions of a prompt share its tokens and images, so ``generate``
            pre-fills each prompt (images included) once and repeats its cache for the G rows
            (``backbone/decoding.py``) and ``token_logprobs`` runs each prompt once for its G
            completions: in one process against the prompt's repeated key/value cache; under
            FSDP2, activation checkpointing or for text-only prompts as one sequence
            ``[prompt, c_1, ..., c_G]`` whose attention runs the prompt once and each completion
            over [prompt, own past] (``sdpa``/``eager``, ``backbone/prefix_group.py``; a model
            loaded with flash-attention falls back to encoding the images once, or to copies). See ``backbone/shared_prompt.py`` and
            :meth:`sharing_mode`. Results equal G separate copies up to float rounding; ``False``
            always runs G copies.
        logprob_chunk_size: (completion, position) pairs whose vocabulary logits ``token_logprobs``
            holds at once (``backbone/logprobs.py``); 512 x 151,936 ids is 297 MiB of float32.
        hub_kernels: let transformers replace layers of a loaded checkpoint with kernels downloaded
            from the model hub (its ``use_kernels``). Off by default, as in transformers 5.17:
            from 5.25 it is on whenever the ``kernels`` package is installed, fetches code at run
            time, and re-kernelises on every train/eval switch, which a reference copy built on
            the meta device for FSDP2 cannot do (``ValueError: Unsupported device type 'meta'``).
    """

    def __init__(
        self,
        model: str = "embedded-tiny",
        vocab: Vocab = "small",
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        freeze_vision: bool = True,
        lora: LoraOptions | None = None,
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        share_prompts: bool = True,
        logprob_chunk_size: int = DEFAULT_CHUNK_SIZE,
        hub_kernels: bool = False,
    ) -> None:
        super().__init__()
        if logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1, got {logprob_chunk_size}")
        self.share_prompts = share_prompts
        self.logprob_chunk_size = logprob_chunk_size
        self.hub_kernels = hub_kernels
        self.last_sharing: Sharing | None = None  # set by sharing_mode: the latest call's choice and fallback
        self._fallbacks_said: set[str] = set()  # fallback warnings already given (shared with frozen copies)
        hf_model, self.processor = load_model_and_processor(
            model,
            vocab=vocab,
            seed=seed,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization=quantization,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            hub_kernels=hub_kernels,
        )
        self.family = family_of(hf_model)
        if freeze_vision:
            self.family.vision_tower(hf_model).requires_grad_(False)
        if gradient_checkpointing and not (quantization and lora):  # else peft's k-bit preparation does it
            _enable_checkpointing(hf_model)
        if lora is not None:
            hf_model = apply_lora(
                hf_model, lora, quantized=quantization is not None, gradient_checkpointing=gradient_checkpointing
            )
        self.model = hf_model  # the PeftModel when LoRA is on, else the transformers model
        self.model.train()  # from_pretrained returns eval mode; Lightning manages modes from here

    # ------------------------------------------------------------------ identity
    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model (with LoRA layers inside it when ``has_lora``)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a completion: the generation config's (Qwen-Instruct lists two), else the tokenizer's."""
        configured = self.hf_model.generation_config.eos_token_id
        if configured is None:
            configured = self.processor.tokenizer.eos_token_id
        return tuple(configured) if isinstance(configured, (list, tuple)) else (configured,)

    @property
    def pad_token_id(self) -> int:
        configured = self.hf_model.generation_config.pad_token_id
        return configured if configured is not None else self.processor.tokenizer.pad_token_id

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Ids that mark image/video slots; never sampled, never fed back as slots."""
        return self.family.vision_token_ids(self.hf_model.config, self.processor.tokenizer)

    # ------------------------------------------------------------------ forward paths
    def forward(self, **batch: torch.Tensor) -> ModelOutput:
        """The transformers forward (``loss`` when ``labels`` are given), with 3-D positions guaranteed."""
        if "mm_token_type_ids" not in batch and "input_ids" in batch:
            batch["mm_token_type_ids"] = self._token_types(batch["input_ids"])
        return self.hf_model(**batch)

    def generate(self, prompt_inputs: Mapping[str, torch.Tensor], **options: Any) -> torch.Tensor:
        """Completion ids [B*G, L] of :meth:`generate_with_logprobs` (same keyword arguments)."""
        return self.generate_with_logprobs(prompt_inputs, **options).ids

    def generate_with_logprobs(
        self,
        prompt_inputs: Mapping[str, torch.Tensor],
        *,
        num_generations: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        min_new_tokens: int = 0,
    ) -> Generated:
        """``num_generations`` completions per prompt (ids [B*G, L], L <= max_new_tokens) and the float32
        log-probs [B*G, L] of their tokens at ``temperature``, recorded as they are drawn.

        Rows ``i*G .. i*G+G-1`` answer prompt ``i``; everything after the first EOS is the pad id (log-prob
        0). Sampling is plain temperature/top-p over the full vocabulary: the checkpoint's own sampling
        defaults (Qwen ships top_k=1, repetition_penalty 1.05) are ignored so that the sampling
        distribution is the one ``token_logprobs`` scores; vision ids are never chosen, nor EOS before
        ``min_new_tokens`` (``backbone/sampling.py``, which also says why the recorded log-probs are
        those of ``token_logprobs``, before those ids are removed). Runs in eval mode without gradient
        (the previous mode is restored), with FSDP2 parameters gathered once for the whole call.

        With ``share_prompts`` each prompt, images included, is pre-filled once and its cache repeated
        for its G rows (``backbone/decoding.py``); greedy decoding, whose G rows are identical, decodes
        each prompt once and copies the result. Without it each prompt is repeated G times first.
        """
        fan_out = num_generations if self.share_prompts else 1  # copies made after the prompt goes in
        inputs = self._expand(self._on_device(prompt_inputs), num_generations // fan_out)  # [B or B*G, P]
        rule = SamplingRule(
            eos_token_ids=self.eos_token_ids,
            suppressed_ids=self.vision_token_ids,
            temperature=temperature,
            top_p=top_p,
            do_sample=do_sample,
            min_new_tokens=min_new_tokens,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.gathered_for_generation():
                generated = decode(
                    self.family,
                    self.hf_model,
                    inputs,
                    rule,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.pad_token_id,
                    fan_out=fan_out if do_sample else 1,
                )  # [B*G, L] (greedy: [B or B*G, L])
        finally:
            self.model.train(was_training)
        if not do_sample and fan_out > 1:
            generated = Generated(*(t.repeat_interleave(fan_out, dim=0) for t in generated))  # [B*G, L]
        return generated

    def completion_mask(self, completion_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B*G, L] long, 1 up to and including the first EOS; truncated [B*G] bool)."""
        return sequences_completion_mask(completion_ids, self.eos_token_ids)

    def token_logprobs(
        self,
        prompt_inputs: Mapping[str, torch.Tensor],
        completion_ids: torch.Tensor,
        *,
        num_generations: int,
        temperature: float = 1.0,
        completion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 log p(completion token | prompt, earlier tokens) -> [B*G, L]; differentiable.

        ``completion_mask`` [B*G, L] is the rollout's own (``Samples.completion_mask``, 1 up to and
        including the first EOS); without it the mask is computed from the ids by the same rule.

        Logits are divided by ``temperature`` (match the sampling temperature). Vocabulary logits
        are computed only where a completion token is predicted, never over the prompt, and only
        ``logprob_chunk_size`` positions at a time (``backbone/logprobs.py``): the model returns final
        hidden states and the output layer runs chunk by chunk, recomputed in backward. Vision ids in
        the completion are fed as pad so they are not read as image slots; their log-probs are still
        those of the given ids.
        Positions after the first EOS are masked from attention and their values are meaningless.
        Runs in whatever mode the module is in (dropout included). With ``share_prompts`` each
        prompt runs once for its G completions (gradients reaching it add up over them;
        :meth:`sharing_mode` says how).
        """
        inputs = self._on_device(prompt_inputs)  # [B, P]
        rows = inputs["input_ids"].shape[0] * num_generations
        if completion_ids.shape[0] != rows:
            raise ValueError(
                f"completion_ids has {completion_ids.shape[0]} rows, expected {rows} "
                f"(prompts x num_generations={num_generations})"
            )
        completion_ids = completion_ids.to(inputs["input_ids"].device)
        fed = replace_tokens(completion_ids, self.vision_token_ids, self.pad_token_id)  # [B*G, L]
        if completion_mask is None:
            mask, _ = sequences_completion_mask(completion_ids, self.eos_token_ids)  # [B*G, L]
        else:
            mask = completion_mask.to(completion_ids.device)  # [B*G, L]
        mode = self.sharing_mode(inputs)
        if self.last_sharing is None or self.last_sharing.mode != mode:  # a forced mode (tests, benchmarks)
            self.last_sharing = Sharing(mode)
        if mode == "grouped":
            hidden = grouped_hidden_states(self.hf_model, inputs, fed, num_generations)  # [B*G, L, H]
        elif mode == "cache":
            hidden = cached_prompt_hidden_states(
                self.family, self.hf_model, inputs, fed, mask, num_generations
            )  # [B*G, L, H]
        else:
            hidden = self._copies_hidden(inputs, fed, mask, num_generations, mode == "images")  # [B*G, L, H]
        return self.logprobs_from_hidden(hidden, completion_ids, temperature)

    def sharing_mode(self, prompt_inputs: Mapping[str, torch.Tensor]) -> SharingMode:
        """How ``token_logprobs`` computes each of these prompts once for its G completions:
        ``grouped``, ``cache``, ``images`` or ``none`` (G copies); see ``backbone/shared_prompt.py``.
        A mode slower than the configuration's fast one is said once per reason at WARNING."""
        sharded = bool(sharding.fsdp_units(self.model))
        sharing = choose_sharing(self.family, self.hf_model, prompt_inputs, share=self.share_prompts, sharded=sharded)
        if sharing.fallback is not None and sharing.fallback not in self._fallbacks_said:
            self._fallbacks_said.add(sharing.fallback)
            _log.warning("%s", sharing.fallback)
        self.last_sharing = sharing
        return sharing.mode

    @property
    def last_sharing_mode(self) -> SharingMode | None:
        """The mode of the latest ``token_logprobs`` call (``None`` before the first); what runs log."""
        return self.last_sharing.mode if self.last_sharing is not None else None

    def logprobs_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """float32 log p(targets) [N, L] from final-normed hidden states [N, L, H] through the output layer.

        ``logprob_chunk_size`` positions at a time, recomputed in backward; see
        :func:`~pathvlm_lightning.backbone.logprobs.chunked_target_logprobs` for the contract.
        """
        weight, bias = output_layer(self.hf_model, dtype=hidden.dtype)
        return chunked_target_logprobs(
            hidden, weight, bias, targets, temperature=temperature, chunk_size=self.logprob_chunk_size
        )

    # ------------------------------------------------------------------ reference model
    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model (LoRA off) inside the block: the GRPO reference at no memory cost."""
        if not self.has_lora:
            raise RuntimeError(
                "adapters_disabled() needs LoRA adapters, but this backbone trains all weights; "
                "use build_frozen_copy() for a reference model"
            )
        with self.model.disable_adapter():
            yield

    def build_frozen_copy(self, *, on_meta: bool = False) -> Backbone:
        """A deep copy in eval mode with every parameter frozen (reference or old policy).

        Build it before sharding: the copy has the same generate/token_logprobs API. With
        ``on_meta`` its parameters are on the meta device and take no memory (buffers are copied):
        the skeleton of a sharded copy, to be sharded, ``to_empty``-ed and filled by the caller.
        """
        if sharding.fsdp_units(self.model):
            raise RuntimeError("build_frozen_copy() must run before apply_fully_shard(); the model is already sharded")
        memo: dict[int, Any] = {id(self._fallbacks_said): self._fallbacks_said}  # a reason is said once per run
        if on_meta:
            for parameter in self.parameters():
                memo[id(parameter)] = torch.nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)
        frozen = copy.deepcopy(self, memo)
        frozen.requires_grad_(False)
        return frozen.eval()

    # ------------------------------------------------------------------ distribution and export
    def apply_fully_shard(self, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> None:
        """FSDP2-shard decoder layers, vision blocks and the root over ``mesh`` (see ``sharding``)."""
        sharding.apply_fully_shard(self.model, mesh, mp_policy)

    def gathered_for_generation(self) -> AbstractContextManager[None]:
        """Context keeping FSDP2 parameters gathered for a whole generation; no-op when unsharded."""
        return sharding.gathered_for_generation(self.model)

    def output_layer_gathered(self) -> AbstractContextManager[None]:
        """Context around one step's log-prob passes: under FSDP2 the root unit (embeddings, output layer)
        is gathered once, at the first pass, and released on exit, instead of once per pass; a no-op
        when unsharded. Close it before the optimizer step (``sharding.root_gathered``)."""
        return sharding.root_gathered(self.model)

    def export(self, path: str | Path) -> Path:
        """Write a transformers-loadable folder (LoRA merged into a copy, safetensors, processor)."""
        return export_pretrained(self.model, self.processor, path)

    # ------------------------------------------------------------------ helpers
    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        config = self.hf_model.config
        return mm_token_types(input_ids, config.image_token_id, config.video_token_id)

    def _copies_hidden(
        self,
        inputs: dict[str, torch.Tensor],
        fed: torch.Tensor,
        mask: torch.Tensor,
        num_generations: int,
        share_images: bool,
    ) -> torch.Tensor:
        """Final hidden states [B*G, L, H] from G full copies of each prompt followed by its completions
        (``share_images``: the copies get image features encoded once instead of pixels)."""
        features = None
        if share_images:
            features = expanded_image_features(self.family, self.hf_model, inputs, num_generations)
            inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        expanded = self._expand(inputs, num_generations)
        input_ids = torch.cat([expanded["input_ids"], fed], dim=1)  # [B*G, P+L]
        attention_mask = torch.cat([expanded["attention_mask"], mask.to(expanded["attention_mask"].dtype)], dim=1)
        outputs = self.hf_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=self._token_types(input_ids),
            pixel_values=expanded.get("pixel_values"),
            image_grid_thw=expanded.get("image_grid_thw"),
            **({"mm_encoder_outputs": features} if features is not None else {}),
            logits_to_keep=1,
            output_hidden_states=True,
            use_cache=False,
        )
        length = fed.shape[1]
        return final_hidden_states(outputs)[:, -length - 1 : -1]  # [B*G, L, H]: position P-1+j predicts token j

    def _on_device(self, prompt_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prompt tensors on the model's device, with token types."""
        device = next(self.hf_model.parameters()).device
        inputs = {k: v.to(device) for k, v in prompt_inputs.items() if isinstance(v, torch.Tensor)}
        inputs["mm_token_type_ids"] = self._token_types(inputs["input_ids"])
        return inputs

    def _expand(self, inputs: Mapping[str, torch.Tensor], num_generations: int) -> dict[str, torch.Tensor]:
        """Device-side prompt inputs repeated G times per prompt (rows ``i*G .. i*G+G-1``: prompt ``i``)."""
        config = self.hf_model.config
        return expand_prompt_inputs(
            inputs,
            num_generations,
            image_token_id=config.image_token_id,
            merge_size=config.vision_config.spatial_merge_size,
        )


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (``activation_checkpointing_enable`` is absent in transformers 5.17)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
