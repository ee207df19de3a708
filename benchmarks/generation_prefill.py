"""Generation time of one prefill per prompt (``Backbone.generate``) against transformers' ``generate`` with
``num_return_sequences=G`` (what ``Backbone.generate`` called before), in one run.

    python benchmarks/generation_prefill.py --model embedded-small --image-size 980 --num-generations 8 \
        --new-tokens 32 --repeats 3 --output generation_prefill.json

B prompts, each one ``--image-size`` square image (980 px: 35 x 35 = 1,225 image tokens, P ~ 1,260 with
the chat text), G completions each, forced to ``--new-tokens`` tokens (min = max), sampled at T = 1
over the full vocabulary with vision ids suppressed: the same options on both sides. The two paths
alternate, ``--repeats`` times each; printed are the median wall and CPU seconds (this process, all
threads), their ratio, and the prompt positions each path sends through the first decoder layer
(counted by a forward hook), against B x P. The floor is the ratio of positions through the decoder,
``(P + G*C) / (G*(P + C))``; decoding also reads the prompt's cache every step on both sides, which
the floor does not count. ``--sampler-only`` times just the draw of one token per row from
``--sampler-rows`` x 151,936 logits: ``torch.multinomial`` over the softmax (what transformers'
sampler does), an exponential race (``argmax(p / E)``, one float64 uniform per id) and the inverse-CDF
draw of ``backbone/sampling.py`` (one uniform per row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.backbone.sampling import inverse_cdf_sample


def prompts_with_images(backbone: Backbone, count: int, size: int) -> dict[str, torch.Tensor]:
    """``count`` left-padded chat prompts, each with one seeded random ``size`` x ``size`` image."""
    processor = backbone.processor
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in ["Which stain dominates this tile?", "Grade the nuclei."][:count]
    ]
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(count)
    ]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def generate_today(backbone: Backbone, prompts: dict[str, torch.Tensor], g: int, new_tokens: int) -> torch.Tensor:
    """The former ``Backbone.generate``: transformers' sampler, the prompt repeated G times after its image."""
    inputs = backbone._on_device(prompts)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_return_sequences=g,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=list(backbone.eos_token_ids),
        pad_token_id=backbone.pad_token_id,
        suppress_tokens=list(backbone.vision_token_ids),
        repetition_penalty=1.0,
        use_cache=True,
    )
    model = backbone.hf_model
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    with torch.no_grad():
        return model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1] :]


def timed(run: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def time_samplers(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median seconds of one draw per row from [rows, vocab] logits: multinomial, exponential race, inverse CDF."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3

    def race() -> torch.Tensor:
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
        return weights.div_(torch.rand(logits.shape, dtype=torch.float64).log_().neg_().float()).argmax(dim=-1)

    draws = {
        "multinomial_s": lambda: torch.multinomial(torch.softmax(logits, dim=-1), 1),
        "race_s": race,
        "inverse_cdf_s": lambda: inverse_cdf_sample(logits),
    }
    times: dict[str, list[float]] = {name: [] for name in draws}
    for _ in range(repeats + 1):
        for name, draw in draws.items():
            start = time.perf_counter()
            draw()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t[1:]) for name, t in times.items()}
    result["race_over_multinomial"] = result["race_s"] / result["multinomial_s"]
    result["inverse_cdf_over_multinomial"] = result["inverse_cdf_s"] / result["multinomial_s"]
    return {"rows": rows, "vocab": vocab, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-small")
    parser.add_argument("--vocab", default="small", choices=["small", "qwen"])
    parser.add_argument("--prompts", type=int, default=2, help="B")
    parser.add_argument("--image-size", type=int, default=980)
    parser.add_argument("--num-generations", type=int, default=8, help="G")
    parser.add_argument("--new-tokens", type=int, default=32, help="C")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="write the results as JSON")
    parser.add_argument("--sampler-only", action="store_true", help="time the token draw alone")
    parser.add_argument("--sampler-rows", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sampler_only:
        print(json.dumps(time_samplers(args.sampler_rows, 151936, max(args.repeats, 10)), indent=2))
        return
    g, c = args.num_generations, args.new_tokens
    backbone = Backbone(model=args.model, vocab=args.vocab, max_pixels=args.image_size**2).eval()
    prompts = prompts_with_images(backbone, args.prompts, args.image_size)
    b, p = prompts["input_ids"].shape
    positions: list[int] = []  # prompt positions per first-layer call (calls longer than one token)
    backbone.family.decoder_layers(backbone.hf_model)[0].register_forward_hook(
        lambda module, inputs, output: positions.append(inputs[0].shape[0] * inputs[0].shape[1])
        if inputs[0].shape[1] > 1
        else None
    )
    paths = {
        "today": lambda: generate_today(backbone, prompts, g, c),
        "one_prefill": lambda: backbone.generate(prompts, num_generations=g, max_new_tokens=c, min_new_tokens=c),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    prompt_positions: dict[str, int] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and counts positions
        for name, run in paths.items():
            positions.clear()
            wall, cpu, out = timed(run)
            assert out.shape == (b * g, c), out.shape
            if repeat == 0:
                prompt_positions[name] = sum(positions)
            else:
                runs[name].append((wall, cpu))
    result = {
        "model": args.model,
        "vocab": args.vocab,
        "B": b,
        "P": p,
        "G": g,
        "C": c,
        "threads": args.threads,
        "floor": (p + g * c) / (g * (p + c)),
    }
    for name in paths:
        result[name] = {
            "wall_s": statistics.median(w for w, _ in runs[name]),
            "cpu_s": statistics.median(u for _, u in runs[name]),
            "walls": [w for w, _ in runs[name]],
            "prompt_positions_over_BP": prompt_positions[name] / (b * p),
        }
    for kind in ("wall_s", "cpu_s"):
        result[f"ratio_{kind}"] = result["one_prefill"][kind] / result["today"][kind]
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
