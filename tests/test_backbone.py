"""The Backbone wrapper: freezing, LoRA, generation, token log-probs, reference, export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from pathvlm_lightning.backbone import LoraOptions, completion_mask, load_processor, pad_after_eos
from pathvlm_lightning.backbone.sequences import expand_prompt_inputs, expanded_image_order, images_per_row

IMAGE_PAD = 1010  # tiny vocabulary: see test_tiny_model.test_vocabulary_layout
EOS, PAD = 1000, 998
REPO_ROOT = Path(__file__).resolve().parents[1]


def _prompts(processor, questions: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Left-padded chat prompts, one image of ``size`` x ``size`` each (pixels seeded by the size)."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    images = [Image.fromarray(np.random.default_rng(s).integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in sizes]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.fixture
def prompts(tiny_processor) -> dict[str, torch.Tensor]:
    # Different lengths and image sizes, so left padding and per-image patch blocks both matter.
    return _prompts(tiny_processor, ["Which stain dominates the tile?", "Size?"], [112, 56])


def _bias_logits(backbone, token_ids: list[int], amount: float) -> None:
    """Add ``amount`` to the logits of ``token_ids`` (lm_head is tied to the embeddings, so as a bias)."""
    bias = torch.zeros(backbone.hf_model.config.text_config.vocab_size)
    bias[token_ids] = amount
    backbone.hf_model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)


def _naive_logprobs(backbone, prompt_inputs, completion_ids, num_generations, temperature=1.0):
    """Full-vocabulary logits for every position, log_softmax, gather: the definition."""
    g = num_generations
    ids = torch.cat([prompt_inputs["input_ids"].repeat_interleave(g, 0), completion_ids], dim=1)
    prompt_mask = prompt_inputs["attention_mask"].repeat_interleave(g, 0)
    mask = torch.cat([prompt_mask, completion_mask(completion_ids, [EOS])[0]], dim=1)
    # One image per prompt here, so repeating each image's grid row and patch block G times is the expansion.
    grid = prompt_inputs["image_grid_thw"]
    blocks = prompt_inputs["pixel_values"].split(grid.prod(-1).tolist())
    pixels = torch.cat([b for b in blocks for _ in range(g)])
    logits = backbone(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid.repeat_interleave(g, 0)
    ).logits  # [B*G, P+L, V]
    length = completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -length - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- construction
def test_freeze_vision(tiny_backbone):
    backbone = tiny_backbone()
    assert not any(p.requires_grad for p in backbone.hf_model.model.visual.parameters())
    assert all(p.requires_grad for p in backbone.hf_model.model.language_model.parameters())
    unfrozen = tiny_backbone(freeze_vision=False)
    assert all(p.requires_grad for p in unfrozen.hf_model.model.visual.merger.parameters())


def test_lora_trains_only_language_model_adapters(tiny_backbone):
    backbone = tiny_backbone(lora=LoraOptions(r=4, alpha=8))
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    # 2 layers x 7 projections x (A, B)
    assert len(trainable) == 28
    assert all("lora_" in n and ".language_model." in n for n in trainable)
    assert backbone.has_lora and not tiny_backbone().has_lora


def test_lora_options_are_validated():
    with pytest.raises(ValueError, match="got 0"):
        LoraOptions(r=0)


def test_pixel_bounds_and_dtype(tiny_backbone, tiny_processor):
    backbone = tiny_backbone(max_pixels=56 * 56, dtype="bfloat16")
    inputs = _prompts(backbone.processor, ["q"], [112])
    assert int((inputs["input_ids"] == IMAGE_PAD).sum()) == 4  # 112 px shrunk to 56 px: 4x4 patches, 2x2 merged
    assert backbone.hf_model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'float8'"):
        tiny_backbone(dtype="float8")


def test_token_ids(tiny_backbone):
    backbone = tiny_backbone()
    assert backbone.eos_token_ids == (EOS,)
    assert backbone.pad_token_id == PAD
    # vision_start, vision_end, vision_pad, image_pad, video_pad
    assert backbone.vision_token_ids == (1007, 1008, 1009, 1010, 1011)


# ---------------------------------------------------------------- sequences
def test_expand_prompt_inputs_repeats_each_prompts_images(prompts):
    expanded = expand_prompt_inputs(prompts, 3, image_token_id=IMAGE_PAD, merge_size=2)
    # 112 px -> 64 patches, 56 px -> 16 patches: [64]*3 then [16]*3.
    first, second = prompts["pixel_values"].split([64, 16])
    assert torch.equal(expanded["pixel_values"], torch.cat([first] * 3 + [second] * 3))
    assert expanded["image_grid_thw"].tolist() == [[1, 8, 8]] * 3 + [[1, 4, 4]] * 3
    assert torch.equal(expanded["input_ids"][3], prompts["input_ids"][1])


def test_image_rows_must_match_grid(prompts):
    with pytest.raises(ValueError, match="prompt row 0 has 16 image tokens"):
        images_per_row(prompts["input_ids"], torch.tensor([[1, 4, 4], [1, 4, 4]]), IMAGE_PAD, 2)


def test_completion_mask_and_padding():
    ids = torch.tensor([[7, EOS, 9, EOS], [7, 8, 9, 6], [EOS, 5, 5, 5]])
    mask, truncated = completion_mask(ids, [EOS])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    assert pad_after_eos(ids, [EOS], PAD).tolist() == [[7, EOS, PAD, PAD], [7, 8, 9, 6], [EOS, PAD, PAD, PAD]]


# ---------------------------------------------------------------- generate
def test_generate_shapes_and_modes(tiny_backbone, prompts):
    backbone = tiny_backbone()
    out = backbone.generate(prompts, num_generations=4, max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (8, 6) and out.dtype == torch.long
    assert backbone.training  # restored
    backbone.eval()
    backbone.generate(prompts, num_generations=1, max_new_tokens=2)
    assert not backbone.training


def test_generate_groups_rows_by_prompt(tiny_backbone, prompts):
    backbone = tiny_backbone()
    greedy = backbone.generate(prompts, num_generations=3, max_new_tokens=8, do_sample=False)
    # Greedy copies of one prompt agree, and the batched, left-padded prompt 1 decodes as it does alone.
    assert torch.equal(greedy[0], greedy[2]) and torch.equal(greedy[3], greedy[5])
    alone = _prompts(backbone.processor, ["Size?"], [56])
    single = backbone.generate(alone, num_generations=1, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy[3, : single.shape[1]], single[0])


def test_generate_pads_after_eos(tiny_backbone, prompts):
    backbone = tiny_backbone()
    _bias_logits(backbone, [EOS], 5.0)  # EOS likely but not certain: rows end at different places
    out = backbone.generate(prompts, num_generations=8, max_new_tokens=12)
    mask, truncated = backbone.completion_mask(out)
    assert (~truncated).sum() >= 8
    assert bool((out[mask == 0] == PAD).all())
    first_eos = (out == EOS).long().argmax(1)[~truncated]
    assert first_eos.unique().numel() > 1


def test_generate_never_samples_vision_tokens(tiny_backbone, prompts):
    backbone = tiny_backbone()
    vision = list(backbone.vision_token_ids)
    _bias_logits(backbone, vision, 30.0)
    # Without suppression the model would now put nearly all mass on vision tokens.
    probe = torch.tensor([[IMAGE_PAD]] * 2)
    assert backbone.token_logprobs(prompts, probe, num_generations=1).exp().min() > 0.1
    out = backbone.generate(prompts, num_generations=4, max_new_tokens=16, min_new_tokens=16, temperature=2.0)
    assert not torch.isin(out, torch.tensor(vision)).any()


# ---------------------------------------------------------------- token log-probs
def test_token_logprobs_match_naive_computation(tiny_backbone, prompts):
    backbone = tiny_backbone()
    completions = backbone.generate(prompts, num_generations=2, max_new_tokens=10, min_new_tokens=10)
    completions[1, 4] = EOS  # one row ends early: masked tail
    completions[1, 5:] = PAD
    ours = backbone.token_logprobs(prompts, completions, num_generations=2)
    naive = _naive_logprobs(backbone, prompts, completions, 2)
    mask, _ = completion_mask(completions, [EOS])
    assert ours.dtype == torch.float32 and ours.shape == (4, 10)
    torch.testing.assert_close(ours[mask == 1], naive[mask == 1], atol=1e-5, rtol=1e-5)


def test_token_logprobs_temperature(tiny_backbone, prompts):
    backbone = tiny_backbone()
    completions = backbone.generate(prompts, num_generations=1, max_new_tokens=5, min_new_tokens=5)
    hot = backbone.token_logprobs(prompts, completions, num_generations=1, temperature=2.0)
    torch.testing.assert_close(hot, _naive_logprobs(backbone, prompts, completions, 1, 2.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hot, backbone.token_logprobs(prompts, completions, num_generations=1))


@pytest.mark.parametrize(("share_prompts", "expected"), [(True, [1, 1]), (False, [1])])
def test_token_logprobs_only_compute_completion_logits(tiny_backbone, prompts, share_prompts, expected):
    backbone = tiny_backbone(share_prompts=share_prompts)
    positions = []
    backbone.hf_model.lm_head.register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
    completions = torch.full((2, 7), 5)
    backbone.token_logprobs(prompts, completions, num_generations=1)
    # The model's lm_head runs over one position per forward (shared: the prompt pass and the completion
    # pass; copies: one pass); log-probs come from hidden states, projected in chunks by
    # backbone/logprobs.py. Never the prompt's 30-odd positions.
    assert positions == expected


def test_token_logprobs_backpropagate(tiny_backbone, prompts):
    backbone = tiny_backbone(lora=LoraOptions(r=2))
    logp = backbone.token_logprobs(prompts, torch.full((4, 3), 5), num_generations=2)
    logp.sum().backward()
    lora_a = backbone.hf_model.model.language_model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.grad is None or lora_a.grad.abs().sum() == 0  # B starts at zero: no gradient reaches A yet
    lora_b = backbone.hf_model.model.language_model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.grad.abs().sum() > 0


def test_image_pad_in_completion_is_scored_not_read_as_image(tiny_backbone, prompts):
    backbone = tiny_backbone()
    completions = torch.tensor([[5, IMAGE_PAD, 6, EOS], [IMAGE_PAD, 1007, 1008, EOS]])
    logp = backbone.token_logprobs(prompts, completions, num_generations=1)  # "image tokens != features" before
    assert torch.isfinite(logp).all()


def test_left_padding_does_not_change_logprobs(tiny_backbone, prompts):
    backbone = tiny_backbone()
    completions = torch.tensor([[11, 12, 13, EOS]] * 2)
    batched = backbone.token_logprobs(prompts, completions, num_generations=1)
    alone = backbone.token_logprobs(_prompts(backbone.processor, ["Size?"], [56]), completions[1:], num_generations=1)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- reference model
def _randomise_lora_b(backbone) -> None:
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_adapters_disabled_gives_base_model(tiny_backbone, prompts):
    backbone = tiny_backbone(lora=LoraOptions(r=4))
    _randomise_lora_b(backbone)
    base = tiny_backbone()  # same seed, no adapters
    completions = torch.tensor([[11, 12, 13, EOS]] * 4)
    adapted = backbone.token_logprobs(prompts, completions, num_generations=2)
    with backbone.adapters_disabled():
        disabled = backbone.token_logprobs(prompts, completions, num_generations=2)
    expected = base.token_logprobs(prompts, completions, num_generations=2)
    torch.testing.assert_close(disabled, expected)
    assert (adapted - expected).abs().max() > 1e-2


def test_adapters_disabled_without_lora_is_an_error(tiny_backbone):
    with pytest.raises(RuntimeError, match="build_frozen_copy"):
        with tiny_backbone().adapters_disabled():
            pass


def test_frozen_copy_is_independent(tiny_backbone, prompts):
    backbone = tiny_backbone()
    frozen = backbone.build_frozen_copy()
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    completions = torch.tensor([[11, 12, EOS]] * 2)
    before = frozen.token_logprobs(prompts, completions, num_generations=1)
    with torch.no_grad():
        backbone.hf_model.lm_head.weight.add_(1.0)
    torch.testing.assert_close(frozen.token_logprobs(prompts, completions, num_generations=1), before)


# ---------------------------------------------------------------- one vision pass per prompt
def _mixed_image_prompts(processor) -> dict[str, torch.Tensor]:
    """Row 0 holds two images (112 px: 16 tokens, 56 px: 4), row 1 one (56 px, other pixels)."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for count, question in [(2, "Compare the two tiles."), (1, "Size?")]
    ]
    rngs = [np.random.default_rng(s) for s in (112, 56, 57)]
    images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for rng, s in zip(rngs, (112, 56, 56))]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _images_per_vision_call(backbone) -> list[int]:
    """Filled with the number of images each vision-tower call encodes."""
    calls: list[int] = []
    backbone.hf_model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["grid_thw"].shape[0]), with_kwargs=True
    )
    return calls


def test_expanded_image_order_keeps_each_prompts_images_together(tiny_processor):
    mixed = _mixed_image_prompts(tiny_processor)
    assert expanded_image_order([2, 1], num_generations=3) == [0, 1, 0, 1, 0, 1, 2, 2, 2]
    expanded = expand_prompt_inputs(mixed, 2, image_token_id=IMAGE_PAD, merge_size=2)
    a, b, c = mixed["pixel_values"].split([64, 16, 16])
    assert torch.equal(expanded["pixel_values"], torch.cat([a, b, a, b, c, c]))
    assert expanded["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 4]] * 2 + [[1, 4, 4]] * 2


def _rows_per_decoder_call(backbone) -> list[tuple[int, int]]:
    """Filled with the (rows, tokens) of each call of the first decoder layer."""
    calls: list[tuple[int, int]] = []
    layer = backbone.hf_model.model.language_model.layers[0]
    layer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(args[0].shape[:2])), with_kwargs=True
    )
    return calls


def test_shared_prompts_sample_the_same_completions(tiny_backbone, tiny_processor):
    mixed = _mixed_image_prompts(tiny_processor)
    shared, copies = tiny_backbone(), tiny_backbone(share_prompts=False)  # same seed: same weights
    shared_calls, copies_calls = _images_per_vision_call(shared), _images_per_vision_call(copies)
    results = {}
    for name, backbone in [("shared", shared), ("copies", copies)]:
        torch.manual_seed(0)
        sampled = backbone.generate(mixed, num_generations=3, max_new_tokens=10, min_new_tokens=10)
        greedy = backbone.generate(mixed, num_generations=3, max_new_tokens=10, do_sample=False)
        results[name] = (sampled, greedy)
    assert torch.equal(results["shared"][0], results["copies"][0])
    assert torch.equal(results["shared"][1], results["copies"][1]) and results["shared"][1].shape[0] == 6
    assert results["shared"][0][0].tolist() != results["shared"][0][1].tolist()  # sampled copies differ
    assert shared_calls == [3, 3] and copies_calls == [9, 9]  # 3 images per call instead of 3 x G


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_same_logprobs_and_gradients(tiny_backbone, tiny_processor, checkpointing):
    mixed = _mixed_image_prompts(tiny_processor)
    prompt_length = mixed["input_ids"].shape[1]
    # A trainable vision tower: its gradient must add up over the G rows that share the features.
    # Activation checkpointing drops the prompt cache, so then the grouped sequence shares the prompt.
    kwargs = dict(freeze_vision=False, gradient_checkpointing=checkpointing)
    shared, copies = tiny_backbone(**kwargs), tiny_backbone(share_prompts=False, **kwargs)
    vision_calls = {"shared": _images_per_vision_call(shared), "copies": _images_per_vision_call(copies)}
    decoder_calls = {"shared": _rows_per_decoder_call(shared), "copies": _rows_per_decoder_call(copies)}
    completions = torch.tensor([[11, 12, 13, 14, EOS], [21, 22, EOS, PAD, PAD], [31, IMAGE_PAD, 33, 34, 35]] * 2)
    mask, _ = completion_mask(completions, [EOS])  # values after EOS are meaningless: left out
    logps = {}
    for name, backbone in [("shared", shared), ("copies", copies)]:
        logps[name] = backbone.token_logprobs(mixed, completions, num_generations=3)  # [6, 5]
        logps[name][mask == 1].sum().backward()
    torch.testing.assert_close(logps["shared"][mask == 1], logps["copies"][mask == 1], atol=1e-5, rtol=1e-5)
    copies_params = dict(copies.named_parameters())
    vision_weight, decoder_weight = "visual.patch_embed.proj.weight", "language_model.layers.0.mlp.up_proj.weight"
    for name in [f"model.model.{vision_weight}", f"model.model.{decoder_weight}"]:
        expected = copies_params[name].grad
        assert expected.abs().max() > 0
        torch.testing.assert_close(dict(shared.named_parameters())[name].grad, expected, atol=1e-5, rtol=1e-4)
    assert vision_calls == {"shared": [3], "copies": [9]}
    # Shared: the 2 prompts once, then 6 rows of the 4 fed completion tokens against their cache, or
    # (checkpointing) one sequence per prompt, the prompt then 3 blocks of the 4 fed completion tokens
    # (see tests/test_prefix_group.py); copies: 6 rows of P + L.
    shared_calls = [(2, prompt_length + 3 * 4)] if checkpointing else [(2, prompt_length), (6, 4)]
    assert decoder_calls == {"shared": shared_calls, "copies": [(6, prompt_length + 5)]}


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("use_lora", [False, True])
def test_export_reloads_with_same_logits(tiny_backbone, prompts, tmp_path, use_lora):
    backbone = tiny_backbone(lora=LoraOptions(r=4) if use_lora else None).eval()
    if use_lora:
        _randomise_lora_b(backbone)  # so merging changes the weights
    backbone.export(tmp_path)
    loader = Qwen2_5_VLForConditionalGeneration if use_lora else AutoModelForImageTextToText
    reloaded = loader.from_pretrained(tmp_path).eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    reloaded_inputs = _prompts(load_processor(tmp_path), ["Which stain dominates the tile?", "Size?"], [112, 56])
    assert torch.equal(reloaded_inputs["input_ids"], prompts["input_ids"])
    with torch.no_grad():
        # Merged weights round differently from base + B @ A: float32 noise, not a different model.
        torch.testing.assert_close(reloaded(**prompts).logits, backbone(**prompts).logits, atol=1e-4, rtol=1e-4)
    assert backbone.has_lora == use_lora  # live adapters survive the export


# ---------------------------------------------------------------- quantisation
def test_quantized_lora_backbone_runs_on_cpu(tiny_backbone, prompts):
    # bitsandbytes 0.50 has CPU kernels, so 4-bit QLoRA works here (slowly) instead of failing.
    backbone = tiny_backbone(quantization="4bit", lora=LoraOptions(r=2))
    assert type(backbone.hf_model.model.language_model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert all("lora_" in n for n, p in backbone.named_parameters() if p.requires_grad)
    logp = backbone.token_logprobs(prompts, torch.tensor([[11, 12, EOS]] * 2), num_generations=1)
    reference = tiny_backbone().token_logprobs(prompts, torch.tensor([[11, 12, EOS]] * 2), num_generations=1)
    assert torch.isfinite(logp).all()
    assert (logp - reference).abs().max() < 0.5  # NF4 error, not a different model


def test_unknown_quantization_is_rejected(tiny_backbone):
    with pytest.raises(ValueError, match="'3bit'"):
        tiny_backbone(quantization="3bit")


def test_gradient_checkpointing_gives_same_gradients(tiny_backbone, prompts):
    grads = []
    for checkpointing in (False, True):
        backbone = tiny_backbone(gradient_checkpointing=checkpointing)
        backbone.token_logprobs(prompts, torch.tensor([[11, 12, EOS]] * 2), num_generations=1).sum().backward()
        grads.append(backbone.hf_model.model.language_model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- FSDP2
_FSDP_WORKER = """
import os, sys, numpy as np, torch, torch.distributed as dist
from PIL import Image
from torch.distributed.tensor import DTensor
from torch.distributed.device_mesh import init_device_mesh
from pathvlm_lightning.backbone import Backbone
from tests.worker_exit import exit_after_work

def run(rank):
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + sys.argv[1])
    backbone = Backbone()
    p = backbone.processor
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    text = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    inputs = dict(p(images=[image, image], text=[text, "Which " + text], return_tensors="pt", padding=True))
    expected = backbone.generate(inputs, num_generations=2, max_new_tokens=6, do_sample=False)
    expected_logp = backbone.token_logprobs(inputs, expected, num_generations=2)
    backbone.apply_fully_shard(init_device_mesh("cpu", (2,)))
    out = backbone.generate(inputs, num_generations=2, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected), (out, expected)
    assert all(isinstance(q, DTensor) for q in backbone.parameters()), "parameters left gathered"
    logp = backbone.token_logprobs(inputs, out, num_generations=2)
    torch.testing.assert_close(logp, expected_logp)
    dist.destroy_process_group()
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, nprocs=2)
"""


@pytest.mark.slow
def test_generate_under_fsdp2_matches_unsharded(tmp_path):
    # Two gloo processes: generate (vision tower run before the root forward) and scoring work sharded.
    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_cuda_generate_and_score(tiny_backbone, prompts, dtype, tolerance):
    backbone = tiny_backbone(dtype=dtype, lora=LoraOptions(r=4)).cuda().eval()  # eval: no LoRA dropout
    _randomise_lora_b(backbone)
    out = backbone.generate(prompts, num_generations=4, max_new_tokens=16, min_new_tokens=16)
    assert out.is_cuda and out.shape == (8, 16)
    assert not torch.isin(out, torch.tensor(backbone.vision_token_ids, device="cuda")).any()
    ours = backbone.token_logprobs(prompts, out, num_generations=4)
    naive = _naive_logprobs(backbone, {k: v.cuda() for k, v in prompts.items()}, out, 4)
    torch.testing.assert_close(ours, naive, atol=tolerance, rtol=tolerance)
