"""``Backbone.token_logprobs`` forward+backward: G copies vs the repeated prompt cache vs prefix-grouped.

    python benchmarks/prefix_vs_copies.py --rounds 5 --threads 1 --output prefix_vs_copies.json
    python benchmarks/prefix_vs_copies.py --gradient-checkpointing --output prefix_vs_copies_ckpt.json
    python benchmarks/prefix_vs_copies.py --paper-shape --generations 8 --lengths 1024 256 --rounds 3 \
        --threads 1 --output prefix_vs_copies_paper.json

``--paper-shape``: Qwen2.5-VL-7B's attention geometry on a model CPU holds (text hidden 896 = 7 query
heads x head dim 128, 1 key/value head: 7:1 grouped-query attention, MLP 4,736 (7B's 18,944 / 3,584 =
5.3x hidden; ``--mlp-size 1792`` gives the 2x of the earlier rows), 2 layers; the embedded tiny vision
tower, 1,024-id vocabulary) and one prompt of ~1,300 tokens: a 672x672 image (576 image tokens) and a
long question. ``--with-dense-mask`` adds ``grouped_mask``, the former grouped path with a dense
[B, 1, S, S] mask (``prefix_group.grouped_hidden_states(..., dense_mask=True)``).

Two floors are printed (grouped or cache over copies): the token floor (P + G*C) / (G*(P + C)), the
token ratio of the decoder body, and the multiply-add floor of the decoder body (:func:`flop_floor`):
projections per token plus causal attention per query-key pair, which the token floor leaves out
(the G completions' attention to the prompt, G*C*P pairs, is as large shared as copied).

Otherwise: one process, the embedded ``small`` model (text 256 x 4 layers, vision 128 x 4; fp32, sdpa, vision
tower frozen, language model fully trained), 2 chat prompts with one 448x448 image each (256 image
tokens; the two prompts differ in length, so one is left-padded), G completions of L random text
tokens per prompt (no EOS: every position counts). Sharing modes (``backbone/shared_prompt.py``):
``none`` (G copies), ``cache`` (the prompt's repeated key/value cache) and ``grouped`` (one
sequence per prompt, split attention); with ``--gradient-checkpointing``, which drops caches,
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

import functools
import tempfile

from pathvlm_lightning.backbone import Backbone, prefix_group, wrapper
from pathvlm_lightning.backbone.tiny import build_tiny_config

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


PAPER_QUESTION = "Describe the stain, the nuclei, their size, shape, density and grade of this tissue tile. "


#: Qwen2.5-VL-7B's MLP-to-hidden ratio (18,944 / 3,584) at the paper shape's hidden size 896.
PAPER_MLP = 4736


def flop_floor(text_config: Any, prompt: int, g: int, length: int) -> float:
    """Decoder-body multiply-adds of one shared prompt and its G completions over G copies.

    Per layer: each fed token's projections (q, k, v, o and the gated MLP) and 2 * head_dim per
    query-key pair per query head, causal (a token sees itself and what precedes it). Both feed the
    prompt and the completions' first ``length - 1`` tokens (the last one predicts nothing).

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
    ...                       intermediate_size=16)
    >>> round(flop_floor(cfg, prompt=10, g=4, length=11), 4)  # (50*576 + 675*16) / (4 * (20*576 + 210*16))
    0.6653
    """
    d = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    h, heads, kv = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    per_token = 2 * h * heads * d + 2 * h * kv * d + 3 * h * text_config.intermediate_size
    per_pair = 2 * d * heads
    fed = length - 1

    def causal(n: int) -> int:
        return n * (n + 1) // 2

    copies = g * ((prompt + fed) * per_token + causal(prompt + fed) * per_pair)
    shared = (prompt + g * fed) * per_token + (causal(prompt) + g * (fed * prompt + causal(fed))) * per_pair
    return shared / copies


def paper_shape_backbone(folder: Path, gradient_checkpointing: bool, mlp_size: int = PAPER_MLP) -> Backbone:
    """Random weights with Qwen2.5-VL-7B's attention geometry (see the module docstring), loaded from ``folder``."""
    processor = Backbone(model="embedded-tiny").processor
    config = build_tiny_config(processor.tokenizer, "tiny")
    text = config.text_config
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads = 896, 7, 1
    text.intermediate_size, text.num_hidden_layers = mlp_size, 2
    text.rope_parameters["mrope_section"] = [16, 24, 24]  # sums to head_dim / 2 = 64
    config.vision_config.out_hidden_size = 896
    config.to_json_file(folder / "config.json")
    processor.save_pretrained(folder)
    return Backbone(model=str(folder), gradient_checkpointing=gradient_checkpointing)


def make_prompts(
    backbone: Backbone, image_size: int, questions: tuple[str, ...] = QUESTIONS
) -> dict[str, torch.Tensor]:
    processor = backbone.processor
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in texts]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def measure(backbone: Backbone, mode: str, prompts: dict, completions: torch.Tensor, g: int) -> dict[str, float]:
    """One forward+backward of ``token_logprobs`` with the sharing mode forced to ``mode``."""
    dense = mode == "grouped_mask"
    backbone.sharing_mode = lambda inputs: "grouped" if dense else mode  # instance attribute: forces the path
    original = prefix_group.grouped_hidden_states
    wrapper.grouped_hidden_states = functools.partial(original, dense_mask=True) if dense else original
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
    for mode in modes:  # warm-up: allocator and kernels (on the first 64 tokens: the shapes differ, the code not)
        measure(backbone, mode, prompts, completions[:, :64], g)
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
    parser.add_argument("--paper-shape", action="store_true")
    parser.add_argument("--with-dense-mask", action="store_true")
    parser.add_argument("--mlp-size", type=int, default=PAPER_MLP, help="MLP width with --paper-shape")
    parser.add_argument(
        "--paper-question-chars", type=int, default=3700, help="question length with --paper-shape (3,700: P = 1,301)"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed
    # (glibc would otherwise raise the threshold after the first large free and keep such blocks).
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    torch.manual_seed(0)
    modes = ("none", "images" if args.gradient_checkpointing else "cache")
    modes += ("grouped_mask", "grouped") if args.with_dense_mask else ("grouped",)
    if args.paper_shape:
        folder = Path(tempfile.mkdtemp(prefix="paper_shape_"))
        backbone = paper_shape_backbone(folder, args.gradient_checkpointing, args.mlp_size)
        question = PAPER_QUESTION * 60  # ~1,300 prompt tokens with the 576 image tokens
        prompts = make_prompts(backbone, 672, (question[: args.paper_question_chars],))
    else:
        backbone = Backbone(model="embedded-small", gradient_checkpointing=args.gradient_checkpointing)
        prompts = make_prompts(backbone, args.image_size)
    settings = []
    for g in args.generations:
        for length in args.lengths:
            result = run_setting(backbone, prompts, g, length, args.rounds, modes)
            settings.append(result)
            p = prompts["input_ids"].shape[1]
            result["floor"] = (p + g * length) / (g * (p + length))
            result["flop_floor"] = flop_floor(backbone.model.config.get_text_config(), p, g, length)
            seconds, ratios = result["median_seconds"], result["ratio_to_copies_seconds"]
            memory, memory_ratios = result["median_peak_growth_mib"], result["ratio_to_copies_peak_growth_mib"]
            print(
                f"G={g} L={length} P={prompts['input_ids'].shape[1]}: "
                + "; ".join(
                    f"{m} {seconds[m]:.3f} s (x{ratios[m]:.2f}), +{memory[m]:.0f} MiB (x{memory_ratios[m]:.2f})"
                    for m in modes
                )
                + f"; floor {result['floor']:.3f} (tokens), {result['flop_floor']:.3f} (multiply-adds)"
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
