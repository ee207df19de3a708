"""``Backbone.token_logprobs`` forward+backward: G copies vs the repeated prompt cache vs prefix-grouped.

    python benchmarks/prefix_vs_copies.py --rounds 5 --threads 1 --output prefix_vs_copies.json
    python benchmarks/prefix_vs_copies.py --gradient-checkpointing --output prefix_vs_copies_ckpt.json

One process, the embedded ``small`` model (text 256 x 4 layers, vision 128 x 4; fp32, sdpa, vision
tower frozen, language model fully trained), 2 chat prompts with one 448x448 image each (256 image
tokens; the two prompts differ in length, so one is left-padded), G completions of L random text
tokens per prompt (no EOS: every position counts). Sharing modes (``backbone/shared_prompt.py``):
``none`` (G copies), ``cache`` (the prompt's repeated key/value cache) and ``grouped`` (one
sequence per prompt with a block mask); with ``--gradient-checkpointing``, which drops caches,
``images`` (images encoded once, the prompt tokens G times) takes the place of ``cache``. For each
(G, L) setting the modes run in rounds, the order rotating every round, so load from other
processes falls on all of them alike.
Each measurement is one ``token_logprobs`` call plus ``backward()`` of the summed log-probs:

- wall seconds (``time.perf_counter``);
- peak RSS growth: the process's peak RSS (``VmHWM``) is reset (Linux ``clear_refs``) just before
  the call, and growth is that peak minus the RSS before it. glibc is told to map every block over
  128 KiB on its own and to return freed heap pages before each call, so memory freed by an
  earlier call cannot be reused without showing up.

Printed and written per setting: the median of each mode, the median over rounds of each mode's
ratio to ``none`` (G copies) in the same round, and likewise ``grouped`` over the other sharing mode.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pathvlm_lightning.backbone import Backbone

_LIBC = ctypes.CDLL("libc.so.6")
_M_MMAP_THRESHOLD = -3
QUESTIONS = ("Which stain dominates this tissue tile?", "Size of the nuclei?")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    _LIBC.malloc_trim(0)  # give freed heap pages back, so an earlier call's memory cannot be reused unseen
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def make_prompts(backbone: Backbone, image_size: int) -> dict[str, torch.Tensor]:
    processor = backbone.processor
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS
    ]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in texts]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def measure(backbone: Backbone, mode: str, prompts: dict, completions: torch.Tensor, g: int) -> dict[str, float]:
    """One forward+backward of ``token_logprobs`` with the sharing mode forced to ``mode``."""
    backbone.sharing_mode = lambda inputs: mode  # instance attribute: forces the path for this call
    backbone.zero_grad(set_to_none=True)
    before = _rss_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    backbone.token_logprobs(prompts, completions, num_generations=g).sum().backward()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth_mib": _rss_mib("VmHWM") - before}


def run_setting(
    backbone: Backbone, prompts: dict, g: int, length: int, rounds: int, modes: tuple[str, ...]
) -> dict[str, Any]:
    """``rounds`` measurements of each of ``modes`` (the first is the baseline, the last ``grouped``)."""
    generator = torch.Generator().manual_seed(g * 1000 + length)
    completions = torch.randint(0, 900, (prompts["input_ids"].shape[0] * g, length), generator=generator)  # text ids
    for mode in modes:  # warm-up: allocator and kernels
        measure(backbone, mode, prompts, completions, g)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            runs[mode].append(measure(backbone, mode, prompts, completions, g))
    result: dict[str, Any] = {"num_generations": g, "completion_length": length, "runs": runs}
    other = modes[1]
    for key in ("seconds", "peak_growth_mib"):
        result[f"median_{key}"] = {m: statistics.median(x[key] for x in runs[m]) for m in modes}
        result[f"ratio_to_copies_{key}"] = {
            m: statistics.median(a[key] / b[key] for a, b in zip(runs[m], runs["none"])) for m in modes
        }
        result[f"ratio_grouped_to_{other}_{key}"] = statistics.median(
            a[key] / b[key] for a, b in zip(runs["grouped"], runs[other])
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--generations", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed
    # (glibc would otherwise raise the threshold after the first large free and keep such blocks).
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    torch.manual_seed(0)
    backbone = Backbone(model="embedded-small", gradient_checkpointing=args.gradient_checkpointing)
    modes = ("none", "images" if args.gradient_checkpointing else "cache", "grouped")
    prompts = make_prompts(backbone, args.image_size)
    settings = []
    for g in args.generations:
        for length in args.lengths:
            result = run_setting(backbone, prompts, g, length, args.rounds, modes)
            settings.append(result)
            seconds, ratios = result["median_seconds"], result["ratio_to_copies_seconds"]
            memory, memory_ratios = result["median_peak_growth_mib"], result["ratio_to_copies_peak_growth_mib"]
            print(
                f"G={g} L={length} P={prompts['input_ids'].shape[1]}: "
                + "; ".join(
                    f"{m} {seconds[m]:.3f} s (x{ratios[m]:.2f}), +{memory[m]:.0f} MiB (x{memory_ratios[m]:.2f})"
                    for m in modes
                )
                + f"; grouped/{modes[1]} x{result[f'ratio_grouped_to_{modes[1]}_seconds']:.2f} time, "
                f"x{result[f'ratio_grouped_to_{modes[1]}_peak_growth_mib']:.2f} memory",
                flush=True,
            )
    if args.output is not None:
        report = {
            "settings": settings,
            "prompt_tokens": prompts["input_ids"].shape[1],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "machine": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
