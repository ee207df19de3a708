"""Writing a trained backbone as a folder that plain transformers loads.

The embedded families' processors are subclasses without a video processor (torchvision is
needed to build one). Saved as they are, their files name the subclass, and
``AutoProcessor.from_pretrained`` silently returns a bare tokenizer. So an export names the
family's standard transformers class instead (``Qwen2_5_VLProcessor``, ``Qwen2VLProcessor``,
``Qwen3VLProcessor``, the last also Qwen3.5's), in ``processor_config.json`` and
``tokenizer_config.json``, and carries the video processor settings that class reads (the
family's standard video processor type, patch, merge and normalisation of the image processor).
The subclass the folder was saved from is kept under :data:`EXPORT_KEY`, which transformers
ignores and :func:`pathvlm_lightning.backbone.loading.load_processor` reads to load the folder
without torchvision, with the PIL image processor it was trained with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, ProcessorMixin

from pathvlm_lightning.backbone.sharding import fsdp_units

#: Key of ``processor_config.json`` naming the project's class the folder was saved from.
EXPORT_KEY = "pathvlm_lightning"
#: The video processor each standard processor class builds (transformers' own pairing; its auto
#: mapping leaves the names out where torchvision is missing, so they are written here).
VIDEO_PROCESSORS = {
    "Qwen2VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor",
}
_VIDEO_FIELDS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


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
            save_processor(processor, target)
            return target
        with torch.no_grad():
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(target, safe_serialization=True)
    save_processor(processor, target)
    return target


def standard_class(processor: ProcessorMixin) -> type[ProcessorMixin]:
    """The first transformers class in ``processor``'s ancestry (itself for a standard processor)."""
    return next(c for c in type(processor).__mro__ if c.__module__.startswith("transformers."))


def save_processor(processor: ProcessorMixin, path: Path) -> None:
    """``processor.save_pretrained(path)``, its files naming the standard class (module docstring)."""
    processor.save_pretrained(path)
    standard = standard_class(processor)
    if standard is type(processor):
        return
    config = _read(path / "processor_config.json")
    config["processor_class"] = standard.__name__
    video_type = VIDEO_PROCESSORS.get(standard.__name__)
    image = config.get("image_processor", {})
    if video_type is not None and "video_processor" not in config:
        config["video_processor"] = {"video_processor_type": video_type,
                                     **{k: image[k] for k in _VIDEO_FIELDS if k in image}}  # fmt: skip
    config[EXPORT_KEY] = {
        "processor_class": type(processor).__name__,
        "image_processor_type": type(processor.image_processor).__name__,
    }
    _write(path / "processor_config.json", config)
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        saved = _read(tokenizer_config)
        if "processor_class" in saved:
            saved["processor_class"] = standard.__name__
            _write(tokenizer_config, saved)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
