"""An offline, deterministic stand-in for Qwen2.5-VL: tokenizer, processor and random model.

Tests and the embedded demo need a real ``Qwen2_5_VLForConditionalGeneration`` (same code paths
as the 3B/7B checkpoints) without network access. The tokenizer is a byte-level BPE trained at
call time (a few milliseconds) on a fixed corpus generated here from a seeded ``random.Random``, so
every call, process and machine produces the same vocabulary; no data files ship with the package.
Ids: BPE tokens first, then Qwen's 22 special tokens in Qwen's order, then ``<think>``,
``</think>``, ``<answer>``, ``</answer>`` as ordinary added tokens (one id each, kept by
``decode(skip_special_tokens=True)``); 1,024 ids in all.
"""

from __future__ import annotations

import json
import random
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pathvlm_lightning.backbone.families.qwen import CHATML_TEMPLATE, QWEN_SPECIAL_TOKENS, mrope_section

# The tiny model's chat template: the Qwen families' ChatML (``families/qwen.py``).
TINY_CHAT_TEMPLATE = CHATML_TEMPLATE

VOCAB_SIZE = 1024

REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Same split as Qwen2Tokenizer, so BPE is trained on the pieces it will later see.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# 112x112 -> 8x8 patches -> 16 tokens; 448x448 -> 256 tokens; larger images shrink to <= 256 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 448 * 448

_PROMPT = (
    "Answer the question about the image. Reason step by step inside <think> </think>, "
    "then give the letter and the option text inside <answer> </answer>."
)
_WORDS = (
    "nuclei nucleus nuclear cell cells cytoplasm stain stained staining eosin hematoxylin brown pink "
    "purple blue red violet dark light pale density dense sparse size small medium large very "
    "arranged glandular scattered clustered sheets nests cords tissue tile image slide section "
    "option options answer think question letter text color colour dominates dominant background "
    "blobs spots round oval irregular shape stroma epithelium gland lumen tumor tumour benign "
    "malignant carcinoma adenocarcinoma lymphocytes necrosis mitosis mitotic figures fibrosis "
    "inflammation immunohistochemistry positive negative marker membrane which what how is are the "
    "a an of in on with and or not most best shows seen this that these there than more less high "
    "low grade pattern feature features because so therefore first then step reason reasoning "
    "look looks appears compare correct wrong none all both either many few count number contrast"
).split()
_TEMPLATES = (
    "The {a} nuclei are {b} and {c} in a {d} {e} background.",
    "Which {a} {b} the tile? {c} {d} {e}.",
    "Question: how {a} are the {b}? Options: A) {c} B) {d} C) {e} D) {a}",
    "<think>The {a} {b} looks {c}, so the {d} is {e}.</think><answer>B) {c}</answer>",
    "{a} {b} {c} {d} {e}",
)


# Sentences in the style of the project's prompt and of the built-in synthetic set's questions and
# explanations, repeated so BPE merges whole words: every token saved there shortens every sequence
# the embedded demo trains on.
_DOMAIN_TEXT = (
    "Study the image and reason step by step between <think> and </think>: describe what you see "
    "and rule out the options that do not fit. Then write your final choice between <answer> and "
    "</answer> as the option letter, a closing parenthesis and the option text, "
    "like <answer>X) text of option X</answer>.",
    "Which description best fits this tissue? How large are the nuclei in this tile? What is the "
    "nuclear density of this tissue? Which staining pattern does this tissue tile show?",
    "benign-appearing hyperplastic atypical high-grade small medium large very large sparse moderate "
    "dense very dense H&E IHC, DAB-negative IHC, partly DAB-positive IHC, mostly DAB-positive",
    "The nuclei are large, so enlarged, and dense, so crowded. Enlarged and crowded nuclei suggest a "
    "high-grade lesion, so the answer is high-grade. Nuclei that are neither enlarged nor crowded "
    "look benign, so the answer is benign-appearing.",
    "The nuclei are tiny dots about 5 pixels across. The nuclei are large ovals about 10 pixels "
    "across. Nuclear size is graded small, medium, large or very large by diameter, so the answer is small.",
    "About thirty nuclei crowd the tile. About ten nuclei lie with clear space between them. Density "
    "is graded by how many nuclei fill the tile, so the answer is very dense.",
    "The background is pale blue and every nucleus is blue, none brown. A blue counterstain without "
    "brown DAB is a negative IHC stain, so the answer is IHC, DAB-negative. Pink eosin and purple "
    "hematoxylin nuclei mean H&E.",
)


def _corpus() -> list[str]:
    """A fixed training text: the prompt, domain sentences, the word list, seeded template sentences."""
    rng = random.Random(0)
    lines = [_PROMPT, " ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS), "A) B) C) D) 0 1 2 3 4 5 6 7 8 9"]
    lines += list(_DOMAIN_TEXT) * 200
    for _ in range(2000):
        template = rng.choice(_TEMPLATES)
        lines.append(template.format(**{k: rng.choice(_WORDS) for k in "abcde"}))
    return lines


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges over ``_corpus()`` (deterministic: checked by a test)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """The 1,024-id Qwen-style tokenizer (eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding)."""
    bpe_size = VOCAB_SIZE - len(QWEN_SPECIAL_TOKENS) - len(REASONING_TOKENS)
    vocab, merges = _train_bpe(bpe_size)
    if len(vocab) != bpe_size:
        raise RuntimeError(f"tiny BPE produced {len(vocab)} tokens, expected {bpe_size}: corpus too small")
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = bpe_size + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=TINY_CHAT_TEMPLATE,
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} ids, expected {VOCAB_SIZE}")
    return tokenizer


def build_tiny_image_processor(
    min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor (patch 14, merge 2, temporal 2) with small pixel bounds."""
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )


class TinyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor.

    transformers 5.x type-checks the video slot against a class that needs torchvision; the
    processor derives its parts from this ``__init__`` signature, so dropping the argument drops
    the slot. Save with ``save_pretrained``; reload with ``backbone.loading.load_processor``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_tiny_processor(
    min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS
) -> TinyQwenVLProcessor:
    """Tokenizer + image processor of the embedded model; identical on every call."""
    tokenizer = build_tiny_tokenizer()
    return TinyQwenVLProcessor(
        image_processor=build_tiny_image_processor(min_pixels, max_pixels),
        tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE,
    )


_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 512, "v_depth": 2, "v_hidden": 64},
    "small": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 1024, "v_depth": 4, "v_hidden": 128},
}


def build_tiny_config(
    tokenizer: PreTrainedTokenizerBase, size: Literal["tiny", "small"] = "tiny", vocab_size: int | None = None
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given size whose special-token ids match ``tokenizer``.

    ``vocab_size``: embedding rows (default ``len(tokenizer)``; Qwen pads its 151,665 ids to 151,936).
    """
    if size not in _SIZES:
        raise ValueError(f"tiny model size {size!r} is not one of {sorted(_SIZES)}")
    s = _SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = s["hidden"] // s["heads"]
    text_config = {
        "vocab_size": vocab_size if vocab_size is not None else len(tokenizer),
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": s["v_depth"],
        "hidden_size": s["v_hidden"],
        "intermediate_size": 2 * s["v_hidden"],
        "num_heads": 4,
        "out_hidden_size": s["hidden"],
        "fullatt_block_indexes": [s["v_depth"] - 1],
        "window_size": 112,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_model(
    processor: ProcessorMixin, size: Literal["tiny", "small"] = "tiny", seed: int = 0, vocab_size: int | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL (float32, train mode); the same ``seed`` gives the same weights.

    tiny: text 128 hidden x 2 layers, vision 64 x 2 blocks (~0.8 M parameters; 20 M with Qwen's
    151,936-row vocabulary, tied); small: text 256 x 4, vision 128 x 4 (~4 M; 43 M with Qwen's).
    """
    tokenizer = processor.tokenizer
    config = build_tiny_config(tokenizer, size, vocab_size)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
    )
    return model
