"""Generation: one prefill per prompt, the same greedy output as transformers' generate, the sampler's
distribution and log-probs, and the sampler-trainer agreement figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.decoding import decode
from pathvlm_lightning.backbone.sampling import SamplingRule, inverse_cdf_sample, nucleus
from pathvlm_lightning.grpo.stages import sampler_kl_terms
from tests.test_families import _prompts, twins

# Upper 0.1 % points of the chi-square distribution (tables): a correct sampler exceeds them once in
# a thousand seeds; the seeds below are fixed, so the tests are deterministic.
CHI2_999 = {2: 13.816, 4: 18.467, 5: 20.515}
DRAWS = 200_000
REPO_ROOT = Path(__file__).resolve().parents[1]


def _generate_today(backbone: Backbone, inputs: dict[str, torch.Tensor], max_new_tokens: int):
    """transformers' greedy ``generate`` with the options ``Backbone.generate`` used before it decoded
    itself (vision ids suppressed, the checkpoint's sampling defaults ignored), with its logits."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(backbone.eos_token_ids),
        pad_token_id=backbone.pad_token_id,
        suppress_tokens=list(backbone.vision_token_ids),
        repetition_penalty=1.0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    model = backbone.hf_model
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    ids = out.sequences[:, inputs["input_ids"].shape[1] :]  # [B, L]
    return ids, torch.stack(out.logits, dim=1).float()  # [B, L], [B, L, V]


def _text_prompts(processor) -> dict[str, torch.Tensor]:
    texts = [
        processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("Which stain dominates the tile, and why?", "Size?")
    ]
    return dict(processor(text=texts, return_tensors="pt", padding=True))


# ---------------------------------------------------------------- the same output as generate
@twins
@pytest.mark.parametrize("kind", ["images", "text"])
def test_greedy_output_is_generates_token_for_token(model, kind):
    backbone = Backbone(model=model)
    prompts = _prompts(backbone.processor) if kind == "images" else _text_prompts(backbone.processor)
    temperature, length = 0.8, 12
    ours = backbone.generate_with_logprobs(
        prompts, num_generations=3, max_new_tokens=length, do_sample=False, temperature=temperature
    )
    ids, logits = _generate_today(backbone.eval(), backbone._on_device(prompts), length)
    assert ours.ids.shape == (6, length)
    assert torch.equal(ours.ids, ids.repeat_interleave(3, dim=0))
    # The recorded log-probs are log_softmax(logits / T) of generate's own logits at the chosen ids.
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.logprobs, expected.repeat_interleave(3, dim=0), atol=1e-5, rtol=1e-5)


@twins
def test_repeated_cache_decodes_as_separate_prompts(model):
    # Greedy through the cache repeated for 3 rows (Qwen3.5: convolution and recurrent states too)
    # equals greedy from each prompt's own cache.
    backbone = Backbone(model=model).eval()
    inputs = backbone._on_device(_prompts(backbone.processor))
    rule = SamplingRule(eos_token_ids=backbone.eos_token_ids, suppressed_ids=backbone.vision_token_ids, do_sample=False)
    args = (backbone.family, backbone.hf_model, inputs, rule)
    repeated = decode(*args, max_new_tokens=10, pad_token_id=backbone.pad_token_id, fan_out=3)
    single = decode(*args, max_new_tokens=10, pad_token_id=backbone.pad_token_id, fan_out=1)
    assert torch.equal(repeated.ids, single.ids.repeat_interleave(3, dim=0))
    torch.testing.assert_close(repeated.logprobs, single.logprobs.repeat_interleave(3, dim=0), atol=1e-5, rtol=1e-5)


@twins
def test_sampled_logprobs_are_the_trainers(model):
    # Sampled tokens differ from transformers' (torch.multinomial uses the random stream otherwise), so what is
    # compared is each token's log-prob: the sampler's (a cached decode from one prefill) against the
    # trainer's G full copies of the prompt, in float32.
    backbone, copies = Backbone(model=model), Backbone(model=model, share_prompts=False).eval()
    prompts = _prompts(backbone.processor)
    torch.manual_seed(0)
    sampled = backbone.generate_with_logprobs(prompts, num_generations=4, max_new_tokens=10, temperature=0.7)
    mask, _ = backbone.completion_mask(sampled.ids)
    with torch.no_grad():
        trainer = copies.token_logprobs(prompts, sampled.ids, num_generations=4, temperature=0.7)
    torch.testing.assert_close(sampled.logprobs * mask, trainer * mask, atol=1e-5, rtol=1e-5)
    assert bool((sampled.logprobs[mask == 0] == 0).all())
    assert sampled.ids[0].tolist() != sampled.ids[1].tolist()  # the G rows are drawn independently
    kl, tokens = sampler_kl_terms(sampled.logprobs, trainer, mask)
    assert tokens == mask.sum() and 0 <= kl / tokens < 1e-6


def _first_layer_calls(backbone: Backbone) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    backbone.family.decoder_layers(backbone.hf_model)[0].register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(args[0].shape[:2])), with_kwargs=True
    )
    return calls


def test_each_prompt_goes_through_the_decoder_once(tiny_backbone, tiny_processor):
    prompts = _prompts(tiny_processor)
    length = prompts["input_ids"].shape[1]
    calls = {}
    for name, backbone in [("shared", tiny_backbone()), ("copies", tiny_backbone(share_prompts=False))]:
        calls[name] = _first_layer_calls(backbone)
        backbone.generate(prompts, num_generations=8, max_new_tokens=5, min_new_tokens=5)
    # Shared: the 2 prompts once (2 x P positions), then 16 rows of one token per step. Copies (and
    # transformers' num_return_sequences): 16 x P prompt positions, 8x as many.
    assert calls["shared"] == [(2, length)] + [(16, 1)] * 4
    assert calls["copies"] == [(16, length)] + [(16, 1)] * 4


# ---------------------------------------------------------------- the sampler's distribution
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _chi_square(ids: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the draws ``ids`` against ``probs`` [V] over the ids with probability > 0."""
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    expected = probs.double() * ids.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "an id of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_sampler_draws_from_the_softmax_at_the_temperature():
    rule = SamplingRule(eos_token_ids=(5,), temperature=0.7)
    torch.manual_seed(0)
    ids, logprobs = rule.next_tokens(LOGITS.expand(DRAWS, -1), step=0)  # [DRAWS]
    right = torch.softmax(LOGITS / 0.7, dim=-1)
    assert _chi_square(ids, right) < CHI2_999[5]
    torch.testing.assert_close(logprobs, right.log()[ids])
    # The same test rejects a temperature 10 % off, and plain softmax: it has the power to see one.
    assert _chi_square(ids, torch.softmax(LOGITS / 0.77, dim=-1)) > 10 * CHI2_999[5]
    assert _chi_square(ids, torch.softmax(LOGITS, dim=-1)) > 10 * CHI2_999[5]


def test_nucleus_keeps_the_most_likely_ids_up_to_top_p():
    # softmax(LOGITS) = .561 .206 .125 .076 .028 .004: ids 0-2 hold .892 >= 0.8, ids 0-1 only .767.
    torch.manual_seed(1)
    ids = inverse_cdf_sample(nucleus(LOGITS.expand(DRAWS, -1), 0.8))
    kept = torch.softmax(LOGITS, dim=-1) * torch.tensor([1, 1, 1, 0, 0, 0])
    assert _chi_square(ids, kept / kept.sum()) < CHI2_999[2]
    assert nucleus(LOGITS[None], 0.5).isfinite().sum() == 1  # the most likely id alone already holds .561
    assert nucleus(LOGITS[None], 1.0).isfinite().all()


@pytest.mark.parametrize("block", [1, 2, 4, 5])  # blocks that divide V = 6, leave a short last block, or are 1 id
def test_block_search_draws_from_the_softmax(block):
    logits = LOGITS.clone()
    logits[3] = -torch.inf  # a removed id inside a block is never drawn
    torch.manual_seed(2)
    ids = inverse_cdf_sample(logits.expand(DRAWS, -1), block=block)
    assert _chi_square(ids, torch.softmax(logits, dim=-1)) < CHI2_999[4]
    assert _chi_square(ids, torch.softmax(logits / 1.1, dim=-1)) > 10 * CHI2_999[4]  # it would see 10 % off


def test_a_sampling_step_allocates_nothing_larger_than_the_logits():
    # A float64 [N, V] running sum (twice the logits) freed at every decoding step raised glibc's mmap
    # threshold above the logits' size and fragmented the heap (+2.2 GiB in benchmark (b)).
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(4, 151_936)
    rule = SamplingRule(eos_token_ids=(0,), suppressed_ids=(1, 2), min_new_tokens=2)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rule.next_tokens(logits, step=0)
    largest = max(event.self_cpu_memory_usage for event in prof.events())  # bytes one op allocated
    assert 0 < largest <= logits.numel() * logits.element_size()


def test_with_the_decode_loops_buffers_a_sampling_step_allocates_nothing_of_the_logits_size():
    # The decode loop passes one float32 [2, N, V] buffer for all its steps: the step then frees no
    # logits-sized block for glibc's heap to fragment on, and draws the same ids and log-probs.
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(4, 151_936)
    scratch = torch.empty(2, *logits.shape)
    for rule in (
        SamplingRule(eos_token_ids=(0,), suppressed_ids=(1, 2), temperature=0.7, min_new_tokens=2),
        SamplingRule(eos_token_ids=(0,), suppressed_ids=(1, 2), do_sample=False),
    ):
        torch.manual_seed(3)
        expected = rule.next_tokens(logits, step=0)
        torch.manual_seed(3)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            got = rule.next_tokens(logits, 0, scratch)
        largest = max(event.self_cpu_memory_usage for event in prof.events())
        assert largest < logits.numel() * logits.element_size() // 4  # only [N, block]- and [N]-sized blocks
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_rule_removes_vision_ids_and_early_eos_but_records_the_full_softmax():
    rule = SamplingRule(eos_token_ids=(0,), suppressed_ids=(1, 2), temperature=1.0, min_new_tokens=2)
    logits = LOGITS.expand(20_000, -1)
    early, early_logprobs = rule.next_tokens(logits, step=1)
    late, _ = rule.next_tokens(logits, step=2)
    assert not torch.isin(early, torch.tensor([0, 1, 2])).any()
    assert not torch.isin(late, torch.tensor([1, 2])).any() and (late == 0).any()
    # The log-prob is that of the whole vocabulary at the temperature, what token_logprobs computes.
    torch.testing.assert_close(early_logprobs, torch.log_softmax(LOGITS, dim=-1)[early])
    greedy = SamplingRule(eos_token_ids=(0,), suppressed_ids=(1,), do_sample=False, min_new_tokens=1)
    assert greedy.next_tokens(LOGITS[None], step=0)[0].item() == 2 and greedy.next_tokens(LOGITS[None], 1)[0] == 0


def test_sampler_kl_terms_by_hand():
    sampler = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, -9.0], [-0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl, tokens = sampler_kl_terms(sampler, trainer, mask)
    d = torch.tensor([-0.5, 0.0, -0.2], dtype=torch.float64)  # trainer - sampler on the 3 tokens
    assert tokens == 3
    torch.testing.assert_close(kl, (d.exp() - 1 - d).sum().float())


# ---------------------------------------------------------------- FSDP2, 2 processes
_FSDP_SAMPLING_WORKER = """
import sys, numpy as np, torch, torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from pathvlm_lightning.backbone import Backbone
from tests.worker_exit import exit_after_work

def run(rank):
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + sys.argv[1])
    backbone = Backbone()
    p = backbone.processor
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True, tokenize=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    inputs = dict(p(images=[image, image], text=[text, "Which " + text], return_tensors="pt", padding=True))
    torch.manual_seed(0)
    expected = backbone.generate_with_logprobs(inputs, num_generations=4, max_new_tokens=8)
    backbone.apply_fully_shard(init_device_mesh("cpu", (2,)))
    torch.manual_seed(0)
    out = backbone.generate_with_logprobs(inputs, num_generations=4, max_new_tokens=8)
    assert torch.equal(out.ids, expected.ids), (out.ids, expected.ids)
    torch.testing.assert_close(out.logprobs, expected.logprobs)
    mask, _ = backbone.completion_mask(out.ids)
    trainer = backbone.token_logprobs(inputs, out.ids, num_generations=4)  # sharded: the grouped pass
    torch.testing.assert_close(out.logprobs * mask, trainer.detach() * mask, atol=1e-5, rtol=1e-5)
    dist.destroy_process_group()
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, nprocs=2)
"""


@pytest.mark.slow
def test_sampling_under_fsdp2_matches_unsharded(tmp_path):
    # The repeated cache and the sampler under FSDP2 (parameters gathered once for the call) draw the
    # same tokens as unsharded under one seed, and their log-probs are the sharded trainer's.
    script = tmp_path / "worker.py"
    script.write_text(_FSDP_SAMPLING_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous")], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
