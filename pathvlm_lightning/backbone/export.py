"""Writing a trained backbone as a folder that plain transformers loads."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, ProcessorMixin

from pathvlm_lightning.backbone.sharding import fsdp_units


def export_pretrained(model: PreTrainedModel | PeftModel, processor: ProcessorMixin, path: str | Path) -> Path:
    """Save model (safetensors) and processor to ``path``; LoRA is merged into a copy first.

    Merging into a deep copy leaves the live adapters untouched, so training can go on after an
    export. A quantised model cannot take merged weights losslessly; there the adapter alone is
    saved (``adapter_config.json`` names the base model, which transformers with peft installed
    loads underneath). Sharded (FSDP2) models must be exported from a full, unsharded copy.
    """
    if fsdp_units(model):
        raise ValueError(
            f"cannot export an FSDP2-sharded model to {str(path)!r}: gather a full state dict first "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)"
        )
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    quantized = bool(getattr(model, "is_quantized", False))  # peft forwards the attribute to the base
    if isinstance(model, PeftModel):
        if quantized:
            model.save_pretrained(target)
            processor.save_pretrained(target)
            return target
        with torch.no_grad():
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    return target
