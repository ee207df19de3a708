"""Embedded twins of every family: random weights from a config, the project's tokenizers, no download.

``embedded-tiny`` is the Qwen2.5-VL twin (its config, tokenizer and image processor are those of
``backbone/tiny.py``, which also builds the larger ``embedded-small``); each other family gets a
twin of the same size (text 128 x 2 layers, vision 64 x 2 blocks) and, with ``vocab="small"``, the
same 1,024-id tokenizer, so the demo configs run on any of them by changing the model line. With
``vocab="qwen"`` a twin gets its family's real tokenizer (``Family.vocab_spec``) and embedding rows.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin, Qwen2VLImageProcessorPil

from pathvlm_lightning.backbone.families import FAMILIES, Family, TwinSize
from pathvlm_lightning.backbone.tiny import TINY_CHAT_TEMPLATE, TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_tokenizer
from pathvlm_lightning.backbone.vocab import build_tokenizer

#: twin name -> ``model_type`` of its family.
TWINS: dict[str, str] = {
    "embedded-tiny": "qwen2_5_vl",
    "embedded-tiny-qwen2-vl": "qwen2_vl",
    "embedded-tiny-qwen3-vl": "qwen3_vl",
    "embedded-tiny-qwen3.5": "qwen3_5",
}


def twin_family(name: str) -> Family:
    return FAMILIES[TWINS[name]]


def build_twin_processor(name: str, vocab: str = "small") -> ProcessorMixin:
    """The twin's processor: the ``small`` or ``qwen`` tokenizer and a PIL image processor with the family's patch."""
    family = twin_family(name)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        patch_size=family.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=list(family.image_mean),
        image_std=list(family.image_std),
    )
    if vocab == "qwen":
        spec = family.vocab_spec()
        tokenizer, template = build_tokenizer(spec), spec.chat_template
    else:
        tokenizer, template = build_tiny_tokenizer(), TINY_CHAT_TEMPLATE
    return family.processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_twin_model(name: str, processor: ProcessorMixin, seed: int = 0, vocab: str = "small") -> PreTrainedModel:
    """The twin's randomly initialised model (float32, train mode); the same ``seed`` gives the same weights.

    Embedding rows: with ``vocab="qwen"`` the real vocabulary's (e.g. 151,936 for Qwen3-VL's 151,669
    ids), else one per id of the processor's tokenizer.
    """
    family = twin_family(name)
    tokenizer = processor.tokenizer
    rows = family.vocab_spec().vocab_size if vocab == "qwen" else len(tokenizer)
    config = family.twin_config(tokenizer, TwinSize(), rows)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = family.model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    return model
