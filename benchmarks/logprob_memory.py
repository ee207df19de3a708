"""Peak memory of one ``token_logprobs`` forward+backward with Qwen's real vocabulary, against the logits' size.

    python benchmarks/logprob_memory.py --lengths 64 256 1024 --full-lengths 64 256 --output logprob_memory.json

The embedded tiny architecture with ``vocab="qwen"`` (151,936 rows, tied), 2 prompts with one
112x112 image each, G=4: N=8 completions of L tokens (random ids, no EOS). Each setting runs in its
own process: build, one warm-up pass at L=8 (first-call allocations), then peak RSS is reset
(``/proc/self/clear_refs``, as ``_lockstep.py`` does) and one forward+backward of ``(logp * w).sum()``
is measured. Growth = peak RSS during that pass - RSS before it, compared with the float32 logits
``N * L * V * 4`` bytes. Modes: ``chunked`` (``Backbone.token_logprobs``, ``logprob_chunk_size``) and
``full`` (the path before chunking: the model's ``[N, L, V]`` logits, then a float32 log-softmax row by
row; do not run it at L=1,024 on a shared machine: it needs about 10.5 GB).

``--full-ft`` measures the vocabulary part of full fine-tuning at a 7B model's width instead:

    python benchmarks/logprob_memory.py --full-ft --lengths 1024 --output logprob_memory_full_ft.json

The output layer alone, ``chunked_target_logprobs`` (and, for comparison, the unchunked path: the
``[N*L, V]`` logits, a float32 ``log_softmax`` and gather), forward + backward of ``(logp * w).sum()``
with a trainable ``[V, H]`` weight (H = ``--hidden-size``, 3,584 as Qwen2.5-VL-7B) and hidden states
``[N*L, H]`` that take a gradient, for each ``--dtypes`` entry: ``bf16`` (the FSDP2 paper path: the
weight gathered in bf16, its gradient bf16 until FSDP's fp32 reduce-scatter), ``autocast`` (float32
weight and gradient, bf16 compute: ``bf16-mixed`` on one device) and ``fp32``. A 7B-wide pass is
~36 TFLOP, too much for a CPU benchmark, so it runs on fake tensors (no data, no compute) under
torch's ``MemTracker``, which counts the bytes of every live tensor storage as the ops run: the
figure ``torch.cuda.max_memory_allocated`` reports, less allocator rounding and GEMM workspaces.
"Vocabulary part" = the peak minus the inputs (weight, hidden states) minus the two gradients every
path returns (weight's in its own dtype, hidden states'), against the float32 logits ``N*L*V*4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

N_PROMPTS, G = 2, 4
ACCEPT_RATIO = 0.2  # issue 9: growth <= 0.2x the fp32 logits at L = 1,024


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _prompts(processor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which stain dominates?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(N_PROMPTS)]
    return dict(processor(text=[text] * N_PROMPTS, images=images, return_tensors="pt", padding=True))


def _full_logits_logprobs(backbone, prompts, completions) -> torch.Tensor:
    """The pre-chunking path: G copies, the model's logits [N, L, V], float32 log-softmax per row."""
    g = G
    ids = torch.cat([prompts["input_ids"].repeat_interleave(g, 0), completions], dim=1)
    mask = torch.cat([prompts["attention_mask"].repeat_interleave(g, 0), torch.ones_like(completions)], dim=1)
    grid = prompts["image_grid_thw"]
    blocks = prompts["pixel_values"].split(grid.prod(-1).tolist())
    pixels = torch.cat([b for b in blocks for _ in range(g)])
    length = completions.shape[1]
    logits = backbone(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        image_grid_thw=grid.repeat_interleave(g, 0),
        logits_to_keep=length + 1,
    ).logits[:, :-1]  # [N, L, V]
    rows = []
    for row_logits, row_ids in zip(logits, completions):  # [L, V], [L]
        scaled = row_logits.float()
        rows.append(scaled.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)  # [N, L]


def run_child(mode: str, length: int, chunk_size: int | None) -> dict:
    from pathvlm_lightning.backbone import Backbone
    from pathvlm_lightning.backbone.logprobs import DEFAULT_CHUNK_SIZE

    torch.manual_seed(0)
    chunk = chunk_size or DEFAULT_CHUNK_SIZE
    backbone = Backbone(model="embedded-tiny", vocab="qwen", logprob_chunk_size=chunk)
    vocab = backbone.hf_model.config.text_config.vocab_size
    prompts = _prompts(backbone.processor)
    n = N_PROMPTS * G

    def one_pass(completion_length: int) -> float:
        completions = torch.randint(0, 151000, (n, completion_length))  # plain text ids: no EOS, no vision id
        weights = torch.randn(n, completion_length)
        start = time.perf_counter()
        if mode == "chunked":
            logp = backbone.token_logprobs(prompts, completions, num_generations=G)
        else:
            logp = _full_logits_logprobs(backbone, prompts, completions)
        (logp * weights).sum().backward()
        return time.perf_counter() - start

    one_pass(8)
    backbone.zero_grad(set_to_none=True)  # gradients are allocated again in the measured pass, as in a step
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    seconds = one_pass(length)
    peak = _status_mib("VmHWM")
    logits_mib = n * length * vocab * 4 / 2**20
    return {
        "mode": mode,
        "completion_length": length,
        "completions": n,
        "vocab_size": vocab,
        "logprob_chunk_size": chunk if mode == "chunked" else None,
        "rss_before_mib": round(before, 1),
        "peak_growth_mib": round(peak - before, 1),
        "fp32_logits_mib": round(logits_mib, 1),
        "growth_over_logits": round((peak - before) / logits_mib, 3),
        "seconds": round(seconds, 2),
    }


def full_ft_vocabulary_part(
    implementation: str, dtype_name: str, pairs: int, hidden_size: int, vocab: int, chunk_size: int
) -> dict:
    """Peak live bytes of one output-layer forward+backward on fake tensors (see the module docstring)."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from pathvlm_lightning.backbone.logprobs import chunked_target_logprobs

    weight_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    hidden_dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    with FakeTensorMode():
        weight = torch.nn.Parameter(torch.empty(vocab, hidden_size, dtype=weight_dtype))  # [V, H]
        hidden = torch.empty(pairs, hidden_size, dtype=hidden_dtype).requires_grad_()  # [N*L, H], takes a gradient
        targets = torch.zeros(pairs, dtype=torch.long)  # [N*L]
        upstream = torch.empty(pairs)  # [N*L]: d loss / d logp
        tracker = MemTracker()
        tracker.track_external(weight, hidden, targets, upstream)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "autocast"):
            if implementation == "chunked":
                logp = chunked_target_logprobs(hidden[None], weight, None, targets[None], chunk_size=chunk_size)[0]
            else:
                logits = F.linear(hidden, weight).float()  # [N*L, V], the model's lm_head, then float32
                logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
                del logits
            (logp * upstream).sum().backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    mib = 2**20
    inputs = vocab * hidden_size * weight.element_size() + pairs * hidden_size * hidden.element_size() + pairs * 12
    grads = vocab * hidden_size * weight.element_size() + pairs * hidden_size * hidden.element_size()
    logits_mib = pairs * vocab * 4 / mib
    part = (peak - inputs - grads) / mib
    return {
        "implementation": implementation,
        "dtype": dtype_name,
        "pairs": pairs,
        "hidden_size": hidden_size,
        "vocab_size": vocab,
        "logprob_chunk_size": chunk_size if implementation == "chunked" else None,
        "peak_mib": round(peak / mib, 1),
        "inputs_mib": round(inputs / mib, 1),
        "gradients_mib": round(grads / mib, 1),
        "vocabulary_part_mib": round(part, 1),
        "fp32_logits_mib": round(logits_mib, 1),
        "vocabulary_part_over_logits": round(part / logits_mib, 3),
    }


def run_full_ft(args: argparse.Namespace) -> dict:
    """Every (length, dtype) of ``args``: the unchunked path and the chunked one, one line each."""
    from pathvlm_lightning.backbone.logprobs import DEFAULT_CHUNK_SIZE

    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    results = []
    for length in args.lengths:
        for dtype_name in args.dtypes:
            for implementation in ("unchunked", "chunked"):
                pairs = N_PROMPTS * G * length
                result = full_ft_vocabulary_part(implementation, dtype_name, pairs, args.hidden_size, args.vocab_size, chunk)
                result["completion_length"] = length
                results.append(result)
                print(
                    f"{implementation:9s} {dtype_name:8s} L={length:5d}  peak {result['peak_mib']:9.1f} MiB  "
                    f"vocabulary part {result['vocabulary_part_mib']:8.1f} MiB = "
                    f"{result['vocabulary_part_over_logits']:.3f}x the fp32 logits ({result['fp32_logits_mib']:.1f} MiB)",
                    flush=True,
                )
    longest = max(args.lengths)
    judged = [r for r in results if r["implementation"] == "chunked" and r["completion_length"] == longest]
    worst = max(r["vocabulary_part_over_logits"] for r in judged)
    report = {"full_ft": results, "acceptance_ratio": ACCEPT_RATIO, "accepted": worst <= ACCEPT_RATIO}
    print(f"full fine-tuning, chunked, L={longest}: at most {worst:.3f}x the fp32 logits "
          f"(acceptance <= {ACCEPT_RATIO}): {'PASS' if report['accepted'] else 'FAIL'}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="chunked path")
    parser.add_argument("--full-lengths", type=int, nargs="*", default=[64, 256], help="pre-chunking path")
    parser.add_argument("--chunk-size", type=int, default=None, help="logprob_chunk_size (default: Backbone's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--full-ft", action="store_true", help="the output layer alone at a 7B width, fake tensors")
    parser.add_argument("--hidden-size", type=int, default=3584, help="--full-ft: H (Qwen2.5-VL-7B: 3,584)")
    parser.add_argument("--vocab-size", type=int, default=151936, help="--full-ft: V (Qwen's: 151,936)")
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "autocast", "fp32"), default=["bf16", "autocast", "fp32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full_ft:
        report = run_full_ft(args)
        if args.output:
            args.output.write_text(json.dumps(report, indent=2))
        return
    if args.child:
        print(json.dumps(run_child(args.child[0], int(args.child[1]), args.chunk_size)))
        return
    settings = [("full", length) for length in args.full_lengths] + [("chunked", length) for length in args.lengths]
    results = []
    for mode, length in settings:
        command = [sys.executable, __file__, "--child", mode, str(length), "--threads", str(args.threads)]
        if args.chunk_size:
            command += ["--chunk-size", str(args.chunk_size)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise SystemExit(f"{mode} L={length} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{mode:8s} L={length:5d}  growth {result['peak_growth_mib']:8.1f} MiB  fp32 logits "
            f"{result['fp32_logits_mib']:8.1f} MiB  ratio {result['growth_over_logits']:.3f}  {result['seconds']:.1f} s",
            flush=True,
        )
    longest = max((r for r in results if r["mode"] == "chunked"), key=lambda r: r["completion_length"], default=None)
    report = {"results": results, "acceptance_ratio": ACCEPT_RATIO}
    if longest is not None:
        report["accepted"] = longest["growth_over_logits"] <= ACCEPT_RATIO
        print(f"chunked at L={longest['completion_length']}: {longest['growth_over_logits']:.3f}x the fp32 logits "
              f"(acceptance <= {ACCEPT_RATIO}): {'PASS' if report['accepted'] else 'FAIL'}")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
