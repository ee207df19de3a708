"""Every model family through the one backbone: each embedded twin trains, shares, samples and exports.

The twins (``embedded-tiny`` = Qwen2.5-VL, ``embedded-tiny-qwen2-vl``, ``embedded-tiny-qwen3-vl``,
``embedded-tiny-qwen3.5``) are real transformers models of each family at ~1 M parameters, so every
family-specific code path (windowed vs. full vision attention, DeepStack, interleaved M-RoPE, the
linear-attention state of Qwen3.5) runs here. Tolerances of the equality checks are those of
``tests/test_backbone.py`` (float32 with another reduction order, measured differences below 3e-6).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlamaConfig

from pathvlm_lightning.backbone import Backbone, LoraOptions, completion_mask, load_processor
from pathvlm_lightning.backbone.families import FAMILIES, family_for_config
from pathvlm_lightning.backbone.tiny import build_tiny_model, build_tiny_processor
from pathvlm_lightning.commands import infer
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.modules import GRPOModule, SFTModule
from tests.dist_worker import FAMILY_SCENARIOS, SCENARIOS, run_scenario
from tests.fit_support import make_datamodule, parameters, trainer_kwargs
from tests.test_distributed import Twin, _compare, _launch
from tests.test_grpo_module import LengthReward, rollout_callback

TWINS = {
    "embedded-tiny": "qwen2_5_vl",
    "embedded-tiny-qwen2-vl": "qwen2_vl",
    "embedded-tiny-qwen3-vl": "qwen3_vl",
    "embedded-tiny-qwen3.5": "qwen3_5",
}
twins = pytest.mark.parametrize("model", list(TWINS))


def _prompts(processor) -> dict[str, torch.Tensor]:
    """Row 0 holds two images (128 and 64 px), row 1 one (64 px, other pixels); left padded."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for count, question in [(2, "Compare the two tiles."), (1, "Size?")]
    ]
    rngs = [np.random.default_rng(s) for s in (112, 56, 57)]
    images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for rng, s in zip(rngs, (128, 64, 64))]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _language_and_vision(backbone: Backbone) -> tuple[set[str], set[str]]:
    """Names of the language model's and of the vision tower's parameters (as ``parameters`` lists them)."""
    vision = {id(p) for p in backbone.family.vision_tower(backbone.hf_model).parameters()}
    language = {id(p) for layer in backbone.family.decoder_layers(backbone.hf_model) for p in layer.parameters()}
    named = list(backbone.named_parameters())
    return {n for n, p in named if id(p) in language}, {n for n, p in named if id(p) in vision}


# ---------------------------------------------------------------- detection
@twins
def test_family_is_detected_from_the_config(model):
    backbone = Backbone(model=model)
    family = FAMILIES[TWINS[model]]
    assert backbone.family is family and type(backbone.hf_model) is family.model_class
    assert backbone.hf_model.config.model_type == TWINS[model]
    assert all(not p.requires_grad for p in family.vision_tower(backbone.hf_model).parameters())
    assert len(family.decoder_layers(backbone.hf_model)) == 2 and len(family.vision_blocks(backbone.hf_model)) == 2


def test_embedded_tiny_is_the_qwen2_5_twin_of_tiny_py():
    # embedded-tiny goes through the families' twin path; it must stay the model tiny.py builds.
    expected = build_tiny_model(build_tiny_processor(), "tiny", seed=0).state_dict()
    built = Backbone(model="embedded-tiny").hf_model.state_dict()
    assert built.keys() == expected.keys() and all(torch.equal(built[k], expected[k]) for k in expected)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model_type 'llama'.*supported families are \['qwen2_5_vl', 'qwen2_vl'"):
        family_for_config(LlamaConfig(), "some/folder")


# ---------------------------------------------------------------- LoRA and QLoRA
@twins
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_lora_adapts_the_language_model_only(model, quantization):
    backbone = Backbone(model=model, lora=LoraOptions(r=2), quantization=quantization)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    layers = backbone.family.decoder_layers(backbone.hf_model)
    assert all(any("lora_" in n for n, _ in layer.named_parameters()) for layer in layers)  # MLPs in every layer
    if quantization:
        assert type(layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    prompts = _prompts(backbone.processor)
    eos = backbone.processor.tokenizer.eos_token_id
    logp = backbone.token_logprobs(prompts, torch.tensor([[11, 12, eos]] * 4), num_generations=2)
    logp.sum().backward()
    grads = [p.grad for n, p in backbone.named_parameters() if "lora_B" in n]  # B starts at 0: A gets none yet
    assert torch.isfinite(logp).all() and all(g is not None and g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------- short fits
@twins
def test_sft_fit_trains_the_language_model_and_keeps_the_vision_tower(model, tmp_path):
    pl.seed_everything(0)
    module = SFTModule(Backbone(model), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    before = parameters(module.backbone)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, datamodule=make_datamodule(tmp_path, module.backbone.processor, "sft", batch_size=2))
    after = parameters(module.backbone)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    language, vision = _language_and_vision(module.backbone)
    assert trainer.global_step == 2 and language and vision
    assert language <= changed  # every decoder weight moved (lr 1e-2, 2 AdamW steps)
    assert not vision & changed  # the frozen tower is bit-identical
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@twins
def test_grpo_fit_trains_the_language_model_and_keeps_the_vision_tower(model, tmp_path):
    pl.seed_everything(0)
    module = GRPOModule(
        Backbone(model),
        rollout_callback(),
        [LengthReward()],
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        loss=GRPOLoss(beta=0.0),
        log_completions_every_n_steps=0,
    )
    before = parameters(module.backbone)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, datamodule=make_datamodule(tmp_path, module.backbone.processor, "prompt"))
    after = parameters(module.backbone)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    language, vision = _language_and_vision(module.backbone)
    assert trainer.global_step == 2
    assert language <= changed  # every decoder weight moved
    assert not vision & changed
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


# ---------------------------------------------------------------- shared prompt / shared images
@twins
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_same_logprobs_and_gradients(model, checkpointing):
    # checkpointing=False: the prompt runs once and its cache (keys/values; Qwen3.5 also its
    # convolution and recurrent states) is repeated G times. True: the cache is dropped in training,
    # so each prompt and its G completions run as one grouped sequence under a block mask; Qwen3.5,
    # whose linear-attention layers no mask can split, only encodes the images once (Qwen3-VL:
    # DeepStack features included either way).
    kwargs = dict(model=model, freeze_vision=False, gradient_checkpointing=checkpointing)
    shared, copies = Backbone(**kwargs), Backbone(share_prompts=False, **kwargs)  # same seed: same weights
    prompts = _prompts(shared.processor)
    calls: dict[str, list[int]] = {"shared": [], "copies": []}  # images per vision-tower call
    rows: dict[str, list[tuple[int, int]]] = {"shared": [], "copies": []}  # (rows, tokens) per decoder call
    for name, backbone in [("shared", shared), ("copies", copies)]:
        backbone.family.vision_tower(backbone.hf_model).register_forward_hook(
            lambda module, args, kwargs, out, seen=calls[name]: seen.append(kwargs["grid_thw"].shape[0]),
            with_kwargs=True,
        )
        backbone.family.decoder_layers(backbone.hf_model)[0].register_forward_hook(
            lambda module, args, out, seen=rows[name]: seen.append(tuple(args[0].shape[:2]))
        )
    tokenizer = shared.processor.tokenizer
    eos, pad, image = tokenizer.eos_token_id, tokenizer.pad_token_id, shared.hf_model.config.image_token_id
    completions = torch.tensor([[11, 12, 13, 14, eos], [21, 22, eos, pad, pad], [31, image, 33, 34, 35]] * 2)
    mask, _ = completion_mask(completions, [eos])
    logps = {}
    for name, backbone in [("shared", shared), ("copies", copies)]:
        logps[name] = backbone.token_logprobs(prompts, completions, num_generations=3)  # [6, 5]
        logps[name][mask == 1].sum().backward()
    torch.testing.assert_close(logps["shared"][mask == 1], logps["copies"][mask == 1], atol=1e-5, rtol=1e-5)
    length = prompts["input_ids"].shape[1]
    copies_shape = (6, length + 5)  # G copies of prompt + completion
    mode = shared.sharing_mode(prompts)
    expected_rows = {
        "cache": [(2, length), (6, 4)],  # the 2 prompts, then 4 fed tokens per completion
        "grouped": [(2, length + 3 * 4)],  # each prompt once with its 3 completions' 4 fed tokens
        "images": [copies_shape],
        "none": [copies_shape],
    }
    if not checkpointing:
        assert mode == "cache"
    elif shared.family.groups_prompts:
        assert mode == "grouped"
    else:  # images encoded once where forward takes mm_encoder_outputs (5.2x); copies on 5.17, with a warning
        images = "mm_encoder_outputs" in inspect.signature(shared.hf_model.forward).parameters
        assert mode == ("images" if images else "none")
    # 3 images encoded once instead of G times (except as copies)
    assert calls == {"shared": [9] if mode == "none" else [3], "copies": [9]}
    assert rows == {"shared": expected_rows[mode], "copies": [copies_shape]}
    expected = dict(copies.named_parameters())
    compared = 0
    for name, parameter in shared.named_parameters():
        if expected[name].grad is not None and expected[name].grad.abs().max() > 0:
            torch.testing.assert_close(parameter.grad, expected[name].grad, atol=1e-5, rtol=1e-4, msg=name)
            compared += 1
    assert compared == sum(1 for p in shared.parameters() if p.requires_grad)  # vision and decoder alike


# ---------------------------------------------------------------- sampling
@twins
def test_generate_never_samples_vision_tokens(model):
    backbone = Backbone(model=model)
    vision = list(backbone.vision_token_ids)
    bias = torch.zeros(backbone.hf_model.config.text_config.vocab_size)
    bias[vision] = 30.0  # without suppression nearly all mass would go to vision ids
    backbone.hf_model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)  # tied weight: bias it
    assert len(vision) == 5  # image, video, vision start/end, vision pad
    prompts = _prompts(backbone.processor)
    probe = torch.tensor([[backbone.hf_model.config.image_token_id]] * 2)
    assert backbone.token_logprobs(prompts, probe, num_generations=1).exp().min() > 0.1  # the bias bites
    out = backbone.generate(prompts, num_generations=4, max_new_tokens=12, temperature=5.0)
    assert out.shape[0] == 8 and not torch.isin(out, torch.tensor(vision)).any()


# ---------------------------------------------------------------- export
@twins
def test_export_reloads_with_auto_model_and_same_greedy_completion(model, tmp_path):
    backbone = Backbone(model=model).eval()
    prompts = _prompts(backbone.processor)
    expected = backbone.generate(prompts, num_generations=1, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    backbone.export(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is backbone.family.model_class
    processor = load_processor(tmp_path)
    assert type(processor) is backbone.family.processor_class
    inputs = _prompts(processor)
    assert torch.equal(inputs["input_ids"], prompts["input_ids"])
    assert torch.equal(inputs["pixel_values"], prompts["pixel_values"])
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected)
    again = Backbone(model=str(tmp_path)).eval()  # the project's loader: what the next stage and infer do
    assert again.family is backbone.family
    assert torch.equal(again.generate(prompts, num_generations=1, max_new_tokens=8, min_new_tokens=8,
                                      do_sample=False), expected)  # fmt: skip


STANDARD_PROCESSORS = {  # the processor class transformers' AutoProcessor maps each model_type to
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_5": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


@twins
def test_export_names_the_standard_processor_class(model, tmp_path):
    """The saved files name transformers' own processor class (not the project's video-less
    subclass, for which AutoProcessor silently returns a bare tokenizer), with a video processor
    section that class reads; AutoProcessor then builds it where torchvision is installed and
    says it needs torchvision where not (here), never a bare tokenizer."""
    from transformers import AutoProcessor

    backbone = Backbone(model=model)
    backbone.export(tmp_path)
    standard, video = STANDARD_PROCESSORS[backbone.hf_model.config.model_type]
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == standard
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["processor_class"] == standard
    image = config["image_processor"]
    assert config["video_processor"]["video_processor_type"] == video
    assert {k: config["video_processor"][k] for k in ("patch_size", "merge_size", "temporal_patch_size")} == {
        k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
    }
    assert config["pathvlm_lightning"] == {"processor_class": backbone.family.processor_class.__name__,
                                           "image_processor_type": "Qwen2VLImageProcessorPil"}  # fmt: skip
    assert (tmp_path / "chat_template.jinja").read_text() == backbone.processor.chat_template
    assert "Tiny" not in (tmp_path / "tokenizer_config.json").read_text() + json.dumps(
        {k: v for k, v in config.items() if k != "pathvlm_lightning"}
    )
    try:
        auto = AutoProcessor.from_pretrained(tmp_path)
    except ImportError as error:  # transformers cannot build the video processor without torchvision
        assert "Torchvision" in str(error)
    else:
        assert type(auto).__name__ == standard and type(auto.video_processor).__name__ == video
        assert len(auto.tokenizer) == len(backbone.processor.tokenizer)


@twins
def test_infer_answers_from_the_twin_and_from_its_export(model, tmp_path, capsys):
    image = tmp_path / "tile.png"
    Image.new("RGB", (64, 64), (200, 120, 160)).save(image)
    Backbone(model=model).export(tmp_path / "export")
    question = ["--image", str(image), "--question", "Which stain?", "--options", "A) H&E", "B) IHC"]
    completions = []
    for source in (model, str(tmp_path / "export")):  # same seed, so the same weights and greedy answer
        assert infer.main(["--model", source, "--json", "--max-new-tokens", "8", *question]) == 0
        completions.append(json.loads(capsys.readouterr().out)["completion"])
    assert completions[0] == completions[1] and completions[0]


# ---------------------------------------------------------------- FSDP2, 2 processes
@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Twin]]:
    """The FSDP2 GRPO scenario of each family in 2 processes (one launch) and in 1 process."""
    two = tmp_path_factory.mktemp("families_two")
    _launch(two, tmp_path_factory.mktemp("families_two_data"), 2, "families")
    data, one = tmp_path_factory.mktemp("families_one_data"), tmp_path_factory.mktemp("families_one")
    singles = {name: Twin(run_scenario(name, s.single(), data, one), one, name) for name, s in FAMILY_SCENARIOS.items()}
    return two, singles


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_SCENARIOS))
def test_fsdp2_grpo_two_processes_match_one(name, family_runs):
    # Qwen2.5-VL's own run is tests/test_distributed.py's grpo_fsdp2, the same scenario.
    assert dataclasses.replace(FAMILY_SCENARIOS[name], model="embedded-tiny") == SCENARIOS["grpo_fsdp2"]
    two, singles = family_runs
    _compare(name, two, singles)


# ---------------------------------------------------------------- real vocabularies
# Published ids: "Hello world" and the special tokens, per family (Qwen2/2.5/3 share their ranks).
QWEN2_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}  # fmt: skip
QWEN3_5_IDS = {
    "<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|vision_start|>": 248053,
    "<|vision_end|>": 248054, "<|vision_pad|>": 248055, "<|image_pad|>": 248056, "<|video_pad|>": 248057,
    "<think>": 248068, "</think>": 248069,
}  # fmt: skip
REAL_VOCAB = {  # model: (ids of "Hello world", special ids, embedding rows)
    "embedded-tiny": ([9707, 1879], QWEN2_IDS, 151936),
    "embedded-tiny-qwen2-vl": ([9707, 1879], QWEN2_IDS, 151936),
    "embedded-tiny-qwen3-vl": ([9707, 1879], {**QWEN2_IDS, "<think>": 151667, "</think>": 151668}, 151936),
    "embedded-tiny-qwen3.5": ([9419, 1814], QWEN3_5_IDS, 248320),
}


@twins
def test_real_vocabulary_twin_has_the_published_ids(model):
    backbone = Backbone(model=model, vocab="qwen")
    hello, specials, rows = REAL_VOCAB[model]
    tokenizer, config = backbone.processor.tokenizer, backbone.hf_model.config
    assert tokenizer("Hello world")["input_ids"] == hello
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in specials} == specials
    assert config.text_config.vocab_size == rows and backbone.eos_token_ids == (specials["<|im_end|>"],)
    # The family's own default config (transformers' copy of the published one) names the same vision ids.
    published = type(config)()
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(config, key) == getattr(published, key), key
    if "<think>" in specials:  # a plain-text token in Qwen3/3.5: kept when decoding
        assert tokenizer.decode([specials["<think>"]], skip_special_tokens=True) == "<think>"
    prompts = _prompts(backbone.processor)
    assert int((prompts["input_ids"] == specials["<|image_pad|>"]).sum()) == sum(
        int(g.prod()) // 4 for g in prompts["image_grid_thw"]
    )
    out = backbone.generate(prompts, num_generations=2, max_new_tokens=4, min_new_tokens=4, temperature=5.0)
    assert out.shape == (4, 4) and not torch.isin(out, torch.tensor(backbone.vision_token_ids)).any()
