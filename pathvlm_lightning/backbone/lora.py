"""LoRA on the language model only (the vision tower stays frozen, as in the paper)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

LM_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraOptions:
    """Low-rank adapters on the language model's linear layers."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scaling numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LM_PROJECTIONS))
    """Linear-layer names inside the language model's decoder layers that get adapters."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraOptions.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraOptions.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraOptions.target_modules is empty: name at least one linear layer")


def language_model_target_regex(names: list[str]) -> str:
    """A peft ``target_modules`` regex matching ``names`` only under ``language_model``.

    The vision blocks of Qwen2.5-VL also own ``gate_proj``/``up_proj``/``down_proj``; a plain name
    list would put adapters on the frozen vision tower too.

    >>> bool(re.fullmatch(language_model_target_regex(["q_proj"]), "model.language_model.layers.0.self_attn.q_proj"))
    True
    >>> bool(re.fullmatch(language_model_target_regex(["up_proj"]), "model.visual.blocks.0.mlp.up_proj"))
    False
    """
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*\.language_model\..*\.({alternatives})"


def apply_lora(
    model: PreTrainedModel, options: LoraOptions, *, quantized: bool, gradient_checkpointing: bool
) -> PeftModel:
    """Wrap ``model`` with LM-only adapters; every base weight ends frozen, adapters trainable.

    A k-bit model first goes through peft's ``prepare_model_for_kbit_training`` (norms to float32,
    base frozen), which is also where its gradient checkpointing is switched on.
    """
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=language_model_target_regex(options.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)
