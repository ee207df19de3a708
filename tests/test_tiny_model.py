"""The embedded tokenizer, processor and random Qwen2.5-VL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from pathvlm_lightning.backbone import TinyQwenVLProcessor, build_tiny_model, build_tiny_processor, load_processor
from pathvlm_lightning.backbone.families.qwen import QWEN_SPECIAL_TOKENS
from pathvlm_lightning.backbone.tiny import REASONING_TOKENS, build_tiny_config

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How dense are the nuclei?"}]}]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _state_dict_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _definition(tokenizer_json: str) -> dict:
    """The tokenizer minus runtime state (padding/truncation change when a batch is padded)."""
    definition = json.loads(tokenizer_json)
    return {k: v for k, v in definition.items() if k not in ("padding", "truncation")}


def test_tokenizer_is_identical_on_every_call(tiny_processor):
    ours, other = tiny_processor.tokenizer, build_tiny_processor().tokenizer
    assert other.get_vocab() == ours.get_vocab()
    assert _definition(other.backend_tokenizer.to_str()) == _definition(ours.backend_tokenizer.to_str())


@pytest.mark.slow
def test_tokenizer_is_identical_across_processes(tiny_processor):
    # Rust hash maps are seeded per process: a fresh interpreter must still train the same BPE.
    code = (
        "from pathvlm_lightning.backbone import build_tiny_processor as b; "
        "print(b().tokenizer.backend_tokenizer.to_str())"
    )
    repo_root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    other = run.stdout
    assert _definition(other) == _definition(tiny_processor.tokenizer.backend_tokenizer.to_str())


def test_vocabulary_layout(tiny_processor):
    tok = tiny_processor.tokenizer
    assert len(tok) == 1024
    # 998 BPE ids, then Qwen's 22 specials in Qwen's order, then the 4 reasoning tags.
    assert [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(998, 1020))
    assert [tok.convert_tokens_to_ids(t) for t in REASONING_TOKENS] == [1020, 1021, 1022, 1023]
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")


def test_reasoning_tags_are_single_tokens_kept_by_decode(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "<think>pink stain</think><answer>B) pink</answer>"
    ids = tok(text + "<|im_end|>").input_ids
    assert ids[0] == 1020 and ids[-1] == tok.eos_token_id
    assert ids.count(1021) == 1 and ids.count(1022) == 1 and ids.count(1023) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tiny_processor):
    text = tiny_processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How dense are the nuclei?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *PROMPT]
    text = tiny_processor.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not text.endswith("assistant\n")


@pytest.mark.parametrize(
    ("height", "width", "tokens"),
    [
        (112, 112, 16),  # 8x8 patches of 14 px, merged 2x2
        (448, 448, 256),  # 32x32 patches
        (112, 224, 32),  # 8x16 patches
        (1000, 1000, 256),  # shrunk to the 448*448 pixel cap
    ],
)
def test_image_token_counts(tiny_processor, height, width, tokens):
    text = tiny_processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    out = tiny_processor(images=[_image(height, width)], text=[text], return_tensors="pt")
    image_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_pad).sum()) == tokens
    assert out["pixel_values"].shape == (tokens * 4, 3 * 2 * 14 * 14)


def test_processor_save_and_load(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert isinstance(loaded, TinyQwenVLProcessor)
    text = tiny_processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    a = tiny_processor(images=[_image(112, 112)], text=[text], return_tensors="pt")
    b = loaded(images=[_image(112, 112)], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert loaded.tokenizer.padding_side == "left"


def test_qwen_processor_folder_without_torchvision_loads_image_only(tiny_processor, tmp_path):
    # A real Qwen2.5-VL folder names Qwen2_5_VLProcessor, whose video half needs torchvision.
    tiny_processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"
    config_file.write_text(json.dumps(config))
    loaded = load_processor(tmp_path)
    assert hasattr(loaded, "image_processor") and len(loaded.tokenizer) == 1024


def test_model_weights_follow_the_seed(tiny_processor):
    a, b, c = (build_tiny_model(tiny_processor, seed=s) for s in (0, 0, 1))
    assert _state_dict_equal(a, b)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_config_ids_match_tokenizer(tiny_processor):
    tok = tiny_processor.tokenizer
    model = build_tiny_model(tiny_processor)
    config = model.config
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size == len(tok)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (1000, 998)
    # head_dim 128 / 4 = 32: mrope sections cover its 16 rotary frequencies.
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 16


@pytest.mark.parametrize(("size", "hidden", "layers"), [("tiny", 128, 2), ("small", 256, 4)])
def test_sizes(tiny_processor, size, hidden, layers):
    config = build_tiny_config(tiny_processor.tokenizer, size)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (hidden, layers)
    assert config.vision_config.out_hidden_size == hidden


def test_unknown_size_is_rejected(tiny_processor):
    with pytest.raises(ValueError, match="'huge'"):
        build_tiny_config(tiny_processor.tokenizer, "huge")


def test_forward_with_labels_trains(tiny_processor):
    model = build_tiny_model(tiny_processor)
    text = tiny_processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) + "<think>x</think>"
    inputs = tiny_processor(images=[_image(112, 112)], text=[text], return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"])
    # Random init: loss near ln(1024) = 6.93 nats.
    assert abs(out.loss.item() - 6.93) < 0.5
    out.loss.backward()
    assert model.model.visual.blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_saved_model_reloads_with_identical_logits(tiny_processor, tmp_path):
    model = build_tiny_model(tiny_processor).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 300, 999]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
