"""Prefix-grouped scoring (``backbone/prefix_group.py``): one sequence ``[prompt, c_1, ..., c_G]`` per prompt
must give the log-probs and gradients of G separate copies, and so must the fallbacks that remain.

Cases share :func:`tests.dist_worker.prefix_case`: 4 image prompts of different lengths (so 3 are
left-padded), G = 3 completions each of 6 tokens, ragged (EOS at position 5, at position 1 with
padding after it, or none) with an image id inside one of them (fed as pad). Values after an EOS
are meaningless and left out.

Tolerance: float32. The grouped sequence reduces attention over other keys and a longer matmul
than a copy does, so sums run in another order and the two sides round differently. Log-probs:
measured within 4e-6, bound atol 1e-5, rtol 1e-5. Gradients: full fine-tuning differs by up to
3e-7 of the tensor's largest entry. The LoRA cases are larger, because their adapters (seeded, see
:func:`_randomise_lora`) are large enough to dominate q/k, so attention logits are large, the
softmax is sharp, and its gradient amplifies rounding. Over 12 adapter draws the worst was 4.9e-5 of
the tensor's largest entry (a q_proj adapter); the seed used here measures 5.3e-6. Bound on each
gradient: rtol 1e-4 and atol 1e-4 x its largest entry. A real error (a completion seeing another
one, a position off by one) moves log-probs by 1e-2 or more, 1,000x their bound.
"""

from __future__ import annotations

import copy
import doctest
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pathvlm_lightning.backbone import Backbone, LoraOptions, grouped_attention, prefix_group, sequences
from pathvlm_lightning.backbone.twins import TWINS, twin_family
from tests.dist_worker import PREFIX_GENERATIONS, grouped_logprobs_and_grads, prefix_case

REPO_ROOT = Path(__file__).resolve().parent.parent
LOGP_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-4


def _assert_same(result: dict, expected: dict) -> None:
    torch.testing.assert_close(result["logps"], expected["logps"], **LOGP_TOL)
    assert result["grads"].keys() == expected["grads"].keys() and expected["grads"]
    for name, grad in expected["grads"].items():
        atol = GRAD_ATOL_OF_MAX * max(grad.abs().max().item(), 1.0)
        difference = (result["grads"][name] - grad).abs().max().item()
        torch.testing.assert_close(result["grads"][name], grad, rtol=GRAD_RTOL, atol=atol, msg=f"{name}: {difference}")
    assert max(grad.abs().max().item() for grad in expected["grads"].values()) > 1e-2  # gradients did arrive


def _calls(module: torch.nn.Module, key) -> list:
    """Filled with ``key(args, kwargs)`` of every forward call of ``module``."""
    calls: list = []
    module.register_forward_hook(lambda m, args, kwargs, out: calls.append(key(args, kwargs)), with_kwargs=True)
    return calls


def _copies_of(backbone):
    """The same weights (adapters included), scoring G copies of each prompt."""
    copies = copy.deepcopy(backbone)
    copies.share_prompts = False
    return copies


def _randomise_lora(backbone, seed: int = 0) -> None:
    """Seeded adapters, so that gradients reach lora_A and the adapters change the outputs.

    peft draws lora_A from the global RNG (whatever earlier tests left there): both factors are drawn
    here from their own generator, lora_A as peft does (uniform within 1/sqrt(fan_in)), lora_B
    non-zero, so the compared numbers do not depend on the test order.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(backbone.named_parameters()):
            if "lora_A" in name:
                bound = parameter.shape[1] ** -0.5
                parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound)
            elif "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_sequence_helpers_by_hand():
    # grouped_attention_mask, grouped_positions, grouped_token_index and GroupLayout carry worked examples.
    assert doctest.testmod(sequences).failed == 0
    assert doctest.testmod(grouped_attention).failed == 0


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements, views included) any op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.where = tensor.numel(), f"{func}: {tuple(tensor.shape)}"
        return out


def _sdpa_calls(monkeypatch) -> list[bool]:
    """Filled with ``lower_right`` of every SDPA call the grouped attention makes (the completion blocks'
    split flash calls on CPU count as one lower-right call: the blocks over [prompt, own past])."""
    calls: list[bool] = []
    original, split = grouped_attention._sdpa, grouped_attention._SplitBlockAttention.apply

    def counted(*args, lower_right):
        calls.append(lower_right)
        return original(*args, lower_right=lower_right)

    def counted_split(*args):
        calls.append(True)
        return split(*args)

    monkeypatch.setattr(grouped_attention, "_sdpa", counted)
    monkeypatch.setattr(grouped_attention._SplitBlockAttention, "apply", counted_split)
    return calls


CASES = {
    "plain": {},
    "checkpointing": {"gradient_checkpointing": True},
    "lora": {"lora": LoraOptions(r=4, dropout=0.0)},
    "lora_checkpointing": {"lora": LoraOptions(r=4, dropout=0.0), "gradient_checkpointing": True},
    "trainable_vision_eager": {"freeze_vision": False, "attn_implementation": "eager"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_equals_copies(tiny_backbone, tiny_processor, case, monkeypatch):
    kwargs = CASES[case]
    grouped = tiny_backbone(**kwargs)
    if "lora" in kwargs:
        _randomise_lora(grouped)
    copies = _copies_of(grouped)
    inputs, completions = prefix_case(tiny_processor)
    # In one process the prompt cache is the default where it can run (it attends over less, see
    # backbone/shared_prompt.py); checkpointing drops it, and then the grouped path is the default.
    assert grouped.sharing_mode(inputs) == ("grouped" if kwargs.get("gradient_checkpointing") else "cache")
    grouped.sharing_mode = lambda prompt_inputs: "grouped"  # the grouped path in every case
    batch, prompt_length = inputs["input_ids"].shape
    assert (inputs["attention_mask"] == 0).any(dim=1).sum() == 3  # all prompts but the longest are padded
    pair = {"grouped": grouped, "copies": copies}
    first_layer = {n: b.hf_model.model.language_model.layers[0] for n, b in pair.items()}
    layers = {n: _calls(layer, lambda a, k: tuple(a[0].shape[:2])) for n, layer in first_layer.items()}
    vision = {n: _calls(b.hf_model.model.visual, lambda a, k: k["grid_thw"].shape[0]) for n, b in pair.items()}
    sdpa_calls = _sdpa_calls(monkeypatch)
    result = grouped_logprobs_and_grads(grouped, inputs, completions, scale=1.0)
    # The split attention ran: per layer and prompt, the prompt once and the G blocks once, again
    # when checkpointing recomputes the layer in backward.
    passes = 2 if kwargs.get("gradient_checkpointing") else 1
    layer_count = len(grouped.family.decoder_layers(grouped.hf_model))
    assert sdpa_calls == [False, True] * batch * layer_count * passes
    assert grouped.hf_model.config.get_text_config()._attn_implementation == kwargs.get("attn_implementation", "sdpa")
    expected = grouped_logprobs_and_grads(copies, inputs, completions, scale=1.0)
    assert expected["mode"] == "none"
    _assert_same(result, expected)
    g, length = PREFIX_GENERATIONS, completions.shape[1]
    # One sequence per prompt, P + G x (L - 1) tokens, and each image encoded once; copies: B x G rows.
    grouped_rows, copies_rows = (batch, prompt_length + g * (length - 1)), (batch * g, prompt_length + length)
    assert layers == {"grouped": [grouped_rows], "copies": [copies_rows]}
    assert vision == {"grouped": [batch], "copies": [batch * g]}


GROUPING_TWINS = [name for name in TWINS if twin_family(name).groups_prompts]


@pytest.mark.slow
@pytest.mark.parametrize("model", GROUPING_TWINS)
def test_every_grouping_family_equals_copies_with_lora_and_checkpointing(model, monkeypatch):
    # Each family that groups (Qwen3.5's linear-attention layers cannot), with LoRA and activation
    # checkpointing: the recomputed layers must attend as grouped sequences again.
    grouped = Backbone(model=model, lora=LoraOptions(r=4, dropout=0.0), gradient_checkpointing=True)
    _randomise_lora(grouped)
    copies = _copies_of(grouped)
    inputs, completions = prefix_case(grouped.processor)
    assert grouped.sharing_mode(inputs) == "grouped"
    sdpa_calls = _sdpa_calls(monkeypatch)
    result = grouped_logprobs_and_grads(grouped, inputs, completions, scale=1.0)
    layer_count = len(grouped.family.decoder_layers(grouped.hf_model))
    assert len(sdpa_calls) == 2 * 2 * inputs["input_ids"].shape[0] * layer_count  # 2 calls, forward + recompute
    _assert_same(result, grouped_logprobs_and_grads(copies, inputs, completions, scale=1.0))


def _largest_tensor_of_pass(backbone, inputs, completions, dense_mask: bool) -> _LargestTensor:
    fed = sequences.replace_tokens(completions, backbone.vision_token_ids, backbone.pad_token_id)
    largest = _LargestTensor()
    with largest:
        hidden = prefix_group.grouped_hidden_states(backbone.hf_model, inputs, fed, 8, dense_mask=dense_mask)
        backbone.logprobs_from_hidden(hidden, completions, 1.0).sum().backward()
    return largest


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_tensor_of_s_squared_elements(tiny_backbone, tiny_processor, checkpointing):
    # 2 prompts x G = 8 completions of 300 tokens: S = P + 8 x 299 = 2,425 tokens per grouped sequence,
    # S^2 = 5.9 M. The largest tensors the pass needs are [B, S, ffn] = 2 x 2,425 x 512 = 2.5 M (MLP
    # activations); attention needs per prompt [G, heads, P + 299, head_dim] keys and values and its
    # [299, P + 299] lower-right mask. Every tensor any op creates in forward and backward (recomputation
    # included) is recorded; the former dense-mask path, run the same way, creates [B, 1, S, S].
    backbone = tiny_backbone(gradient_checkpointing=checkpointing)
    inputs, _ = prefix_case(tiny_processor, slice(0, 2))
    completions = torch.randint(0, 900, (2 * 8, 300), generator=torch.Generator().manual_seed(0))
    s = inputs["input_ids"].shape[1] + 8 * 299
    largest = _largest_tensor_of_pass(backbone, inputs, completions, dense_mask=False)
    assert largest.numel < s * s, largest.where
    assert largest.numel >= 2 * s * 512  # the recorder saw the pass (MLP activations at least)
    assert backbone.hf_model.model.language_model.layers[0].mlp.up_proj.weight.grad is not None
    dense = _largest_tensor_of_pass(backbone, inputs, completions, dense_mask=True)
    assert dense.numel >= s * s, dense.where


def test_lora_adapters_change_what_is_compared(tiny_backbone, tiny_processor):
    # The LoRA cases compare something adapter-dependent: the base model scores differently.
    backbone = tiny_backbone(lora=LoraOptions(r=4, dropout=0.0))
    _randomise_lora(backbone)
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    adapted = backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)
    with backbone.adapters_disabled():
        base = backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)
    assert (adapted - base).abs().max() > 1e-2


def test_text_only_prompts_are_grouped_too(tiny_backbone, tiny_processor):
    # No image: Qwen-VL then counts positions 0..P-1 over the padded prompt, and the grouped path follows.
    grouped = tiny_backbone()
    copies = _copies_of(grouped)
    texts = [
        tiny_processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("Which stain dominates?", "Size?")
    ]
    inputs = dict(tiny_processor(text=texts, return_tensors="pt", padding=True))
    _, completions = prefix_case(tiny_processor, slice(0, 2))
    result = grouped_logprobs_and_grads(grouped, inputs, completions, scale=1.0)
    expected = grouped_logprobs_and_grads(copies, inputs, completions, scale=1.0)
    assert (result["mode"], expected["mode"]) == ("grouped", "none")  # the default for text-only prompts
    _assert_same(result, expected)


@pytest.mark.parametrize(("mode", "checkpointing"), [("cache", False), ("images", True)])
def test_flash_attention_fallbacks_equal_copies(tiny_backbone, tiny_processor, mode, checkpointing):
    # Flash-attention takes no block mask; there the repeated prompt cache (one process, no
    # checkpointing: also the sdpa default) or the images encoded once (checkpointing) share what they can.
    shared = tiny_backbone(gradient_checkpointing=checkpointing)
    copies = _copies_of(shared)
    inputs, completions = prefix_case(tiny_processor)
    shared.hf_model.config.get_text_config()._attn_implementation = "flash_attention_2"
    if mode == "images" and "mm_encoder_outputs" not in inspect.signature(shared.hf_model.forward).parameters:
        # transformers 5.17: no mm_encoder_outputs, so copies (tests/test_sharing_fallbacks.py checks the warning)
        assert shared.sharing_mode(inputs) == "none"
        pytest.skip(f"transformers {transformers.__version__} cannot hand image features to forward")
    assert shared.sharing_mode(inputs) == mode  # what it would choose; forced below on sdpa (no flash on CPU)
    text_only = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    assert shared.sharing_mode(text_only) == "none"
    shared.hf_model.config.get_text_config()._attn_implementation = "sdpa"
    shared.sharing_mode = lambda prompt_inputs: mode
    _assert_same(
        grouped_logprobs_and_grads(shared, inputs, completions, scale=1.0),
        grouped_logprobs_and_grads(copies, inputs, completions, scale=1.0),
    )


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tiny_backbone, tiny_processor, tmp_path):
    # 2 ranks, each scoring 2 of the 4 prompts (padded to its own batch) on a sharded backbone with
    # activation checkpointing and a trainable vision tower; FSDP2 averages the ranks' gradients, so
    # the 1-process twin scores all 4 prompts with half the loss.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = [str(REPO_ROOT / "tests" / "dist_worker.py"), str(tmp_path), str(tmp_path), "prefix"]
    done = subprocess.run([*command, *worker], capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    sharded = torch.load(tmp_path / "prefix.pt")
    assert sharded["modes"] == ["grouped", "grouped"]
    backbone = tiny_backbone(freeze_vision=False, gradient_checkpointing=True)
    inputs, completions = prefix_case(tiny_processor)
    expected = grouped_logprobs_and_grads(backbone, inputs, completions, scale=0.5)
    _assert_same(sharded, expected)


@pytest.mark.slow
def test_fsdp2_every_grouping_family(tmp_path):
    # 2 ranks, FSDP2 + LoRA + activation checkpointing, every family that groups, in one launch
    # (tests/grouped_dist_worker.py): each rank scores 2 of the 4 prompts; FSDP2 averages the
    # ranks' gradients, so the 1-process twin scores all 4 prompts with half the loss.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = [str(REPO_ROOT / "tests" / "grouped_dist_worker.py"), str(tmp_path), *GROUPING_TWINS]
    done = subprocess.run([*command, *worker], capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    for model in GROUPING_TWINS:
        sharded = torch.load(tmp_path / f"{model}.pt")
        assert sharded["modes"] == ["grouped", "grouped"]
        backbone = Backbone(model=model, lora=LoraOptions(r=4, dropout=0.0), gradient_checkpointing=True)
        _randomise_lora(backbone)
        inputs, completions = prefix_case(backbone.processor)
        _assert_same(sharded, grouped_logprobs_and_grads(backbone, inputs, completions, scale=0.5))
