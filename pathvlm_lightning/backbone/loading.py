"""Building the Hugging Face model and processor behind a :class:`Backbone`."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLImageProcessorPil,
)
from transformers.image_utils import SizeDict

from pathvlm_lightning.backbone.export import EXPORT_KEY
from pathvlm_lightning.backbone.families import FAMILIES, Family, family_for_config
from pathvlm_lightning.backbone.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_model, build_tiny_processor
from pathvlm_lightning.backbone.twins import TWINS, build_twin_model, build_twin_processor
from pathvlm_lightning.backbone.vocab import build_processor, qwen2_5_vl_spec

# Embedded models built by ``tiny.build_tiny_model`` only (``embedded-tiny`` is in ``twins.TWINS``).
EMBEDDED_MODELS: dict[str, Literal["tiny", "small"]] = {"embedded-small": "small"}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Quantization = Literal["4bit", "8bit"]
Vocab = Literal["small", "qwen"]
VOCABS = ("small", "qwen")
_log = logging.getLogger(__name__)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def quantization_config(quantization: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings: NF4 with double quantisation (QLoRA's recipe) or LLM.int8."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization {quantization!r} is not one of ['4bit', '8bit'] or None")


def set_pixel_bounds(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Override the image processor's pixel range (each image is resized to fit it, aspect kept)."""
    image_processor = processor.image_processor
    size = image_processor.size
    low = min_pixels if min_pixels is not None else size.shortest_edge
    high = max_pixels if max_pixels is not None else size.longest_edge
    if low > high:
        raise ValueError(f"min_pixels {low} is larger than max_pixels {high}")
    image_processor.size = SizeDict(shortest_edge=low, longest_edge=high)


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load a processor folder or hub id of any family; Qwen-VL ones that need torchvision come back image-only.

    ``AutoProcessor`` silently returns only the tokenizer for a folder saved from one of the
    families' video-less processors (``Family.processor_class``; an export names the standard
    class instead and the video-less one under ``backbone.export.EXPORT_KEY``), and cannot build the Qwen-VL
    processors without torchvision (their video processor); both cases load through the family's
    video-less class, which reads the same tokenizer and image-processor files. Those always come
    back with the PIL image processor they were saved with (where torchvision is installed,
    transformers would otherwise pick its torchvision twin, whose pixel values differ slightly).
    """
    videoless = {f.processor_class.__name__: f.processor_class for f in FAMILIES.values()}
    config_file = Path(path) / "processor_config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    saved_class = saved.get("processor_class")
    exported_from = saved.get(EXPORT_KEY, {}).get("processor_class")  # an export naming the standard class
    if exported_from in videoless or saved_class in videoless:
        processor = videoless[exported_from if exported_from in videoless else saved_class].from_pretrained(str(path))
        processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        return processor
    try:
        return AutoProcessor.from_pretrained(str(path))
    except (OSError, ImportError, ValueError) as auto_error:
        try:
            return _videoless_class(path, saved_class).from_pretrained(str(path))
        except Exception:
            raise auto_error from None


def _videoless_class(path: str | Path, saved_class: str | None) -> type[ProcessorMixin]:
    """The family processor without video for a folder: by its saved processor class, else its model config."""
    for family in FAMILIES.values():
        if saved_class == family.processor_class.__base__.__name__:  # e.g. Qwen2_5_VLProcessor
            return family.processor_class
    return family_for_config(AutoConfig.from_pretrained(str(path)), str(path)).processor_class


def load_model_and_processor(
    model: str,
    *,
    vocab: Vocab = "small",
    seed: int,
    dtype: str,
    attn_implementation: str,
    quantization: Quantization | None,
    min_pixels: int | None,
    max_pixels: int | None,
    hub_kernels: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """``model`` is an embedded model (random weights from ``seed``), a folder or a hub id of any family.

    Embedded: a family's twin (``twins.TWINS``; ``embedded-tiny`` is Qwen2.5-VL's) or the larger
    Qwen2.5-VL ``embedded-small``. Otherwise the family comes from the checkpoint's ``config.model_type``.
    ``vocab`` picks the embedded models' tokenizer: ``small`` (1,024 ids, trained here) or ``qwen``
    (the family's real tokenizer and vocabulary, see ``backbone/vocab.py``); a checkpoint brings its own.
    A folder holding a ``config.json`` and a processor but no weights is an architecture only: random
    weights from ``seed`` at its shape (a 7B-shaped model with no download, for benchmarks).
    """
    embedded = {**EMBEDDED_MODELS, **TWINS}
    if vocab not in VOCABS:
        raise ValueError(f"vocab {vocab!r} is not one of {list(VOCABS)}")
    if vocab != "small" and model not in embedded:
        raise ValueError(
            f"vocab={vocab!r} applies to the embedded models {sorted(embedded)} only; "
            f"{model!r} brings its own tokenizer (leave vocab at 'small')"
        )
    torch_dtype = resolve_dtype(dtype)
    quant = quantization_config(quantization, torch_dtype) if quantization is not None else None
    if model in embedded:
        if model in TWINS:
            processor = build_twin_processor(model, vocab)
            hf_model = build_twin_model(model, processor, seed=seed, vocab=vocab)
        elif vocab == "qwen":
            spec = qwen2_5_vl_spec()
            processor = build_processor(spec, TINY_MIN_PIXELS, TINY_MAX_PIXELS)
            hf_model = build_tiny_model(processor, EMBEDDED_MODELS[model], seed=seed, vocab_size=spec.vocab_size)
        else:
            processor = build_tiny_processor()
            hf_model = build_tiny_model(processor, EMBEDDED_MODELS[model], seed=seed)
        family = family_for_config(hf_model.config, model)
        if quant is not None:
            # bitsandbytes quantises while loading weights, so the random model goes through a folder.
            with tempfile.TemporaryDirectory() as folder:
                hf_model.save_pretrained(folder)
                hf_model = _from_pretrained(family, folder, torch_dtype, attn_implementation, quant, hub_kernels)
        else:
            hf_model = hf_model.to(torch_dtype)
            hf_model.set_attn_implementation(attn_implementation)
    elif _architecture_only(model):
        if quant is not None:
            raise ValueError(f"{model!r} holds a config but no weights: random weights cannot be quantised")
        processor = load_processor(model)
        config = AutoConfig.from_pretrained(model)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            hf_model = family_for_config(config, model).model_class._from_config(
                config, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        if (Path(model) / "generation_config.json").is_file():
            hf_model.generation_config = GenerationConfig.from_pretrained(model)
    else:
        family = family_for_config(AutoConfig.from_pretrained(model), model)
        processor = load_processor(model)
        hf_model = _from_pretrained(family, model, torch_dtype, attn_implementation, quant, hub_kernels)
    _say_attention_fallback(hf_model, attn_implementation, model)
    if min_pixels is not None or max_pixels is not None:
        set_pixel_bounds(processor, min_pixels, max_pixels)
    return hf_model, processor


def _architecture_only(model: str) -> bool:
    """A local folder with ``config.json`` and no weight files (safetensors, bin, adapter)."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return False
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "adapter_config.json"]
    return not any(path.exists() for path in weights)


def _say_attention_fallback(model: PreTrainedModel, requested: str, source: str) -> None:
    """Warn when transformers runs another attention backend than the one asked for (once per load)."""
    used = model.config.get_text_config()._attn_implementation
    if used != requested:
        _log.warning(
            "%s: attn_implementation %r was asked for, transformers runs %r; the attention path (and the "
            "prompt sharing that depends on it, see backbone/shared_prompt.py) is %r's",
            source,
            requested,
            used,
            used,
        )


def _from_pretrained(
    family: Family,
    source: str,
    dtype: torch.dtype,
    attn_implementation: str,
    quant: BitsAndBytesConfig | None,
    hub_kernels: bool,
) -> PreTrainedModel:
    # use_kernels is passed either way: transformers >= 5.25 turns hub kernels on by default when the
    # `kernels` package is installed, and re-applies them on every .train()/.eval() switch, which
    # fails for a copy built on the meta device (the FSDP2 reference) and fetches code from the hub.
    try:
        return family.model_class.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=quant,
            use_kernels=hub_kernels,
        )
    except (ImportError, RuntimeError) as error:
        if quant is None:
            raise
        raise RuntimeError(
            f"loading {source!r} with bitsandbytes {quant.quant_method} quantisation failed: {error}. "
            "Install a bitsandbytes build for this device, or set quantization to null."
        ) from error
