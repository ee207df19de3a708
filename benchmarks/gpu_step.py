"""GRPO steps of a random Qwen2.5-VL-7B-shaped model at paper settings, on one GPU, split into phases, as JSON.

    PYTHONPATH=$PWD python benchmarks/gpu_step.py --output gpu_step.json     # one GPU, <= 8 min on an H200
    PYTHONPATH=$PWD python benchmarks/gpu_step.py --dry-run                  # the same code on CPU, tiny

Nothing is downloaded: the architecture (Qwen2.5-VL-7B's published dimensions, Qwen's real
151,936-row vocabulary built offline by ``backbone/vocab.py``) is written to a folder with no weights,
which ``Backbone`` initialises at random from the seed (``backbone/loading.py``), on the GPU.

Settings: LoRA (r=64, alpha 128) and full fine-tuning (with the frozen reference copy) x G = 4, 8;
one prompt with one 896x896 image (1,024 image tokens) per step, G completions forced to C = 1,024
tokens (``min_new_tokens``), bfloat16 (``bf16-true``), sdpa, activation checkpointing, frozen vision
tower, beta 0.04, AdamW, every step trained (``skip_zero_advantage_steps=False``). **Each setting runs
in its own process** (a fresh CUDA context: no gradients, optimizer state, reference copy or
allocator peak of another setting survives), which writes its JSON; this parent gathers them.

Per setting: ``--warmup`` steps (first-call costs: cuBLAS/cuDNN handles, allocator growth; with
``--warmup-tokens`` completion tokens, the same kernels) and then ``--steps`` timed steps (>= 3),
each a real ``GRPOModule`` step under ``lightning.Trainer``. Each step is split into phases by a
timing callback that wraps public entry points of this run's own objects (CUDA synchronised before
each clock read; nothing else changes): ``generation`` (``RolloutCallback.generate``: sampling,
completion masks, decoding), ``reference`` (``ReferenceModelCallback.reference_logprobs``),
``policy_forward`` (``Backbone.token_logprobs`` outside the reference), ``policy_backward``
(``manual_backward``), ``optimizer`` (the torch optimizer's step hooks: AdamW's update, after
clipping) and ``other`` (rewards, advantages, clipping, logging: step minus the phases). Reported:
medians over the timed steps, completion tokens/s of the whole step (completion tokens / step
seconds) and of generation alone, the peak GPU memory of the timed steps, the sharing mode
(``Backbone.sharing_mode`` of the prompt, and the logged ``rollout/sharing_mode`` when the module
logs it), the attention implementation, the logged ``rollout/sampler_kl`` per step (null when the
module does not log it), torch / transformers / lightning / peft versions and the device.

Time budget on one H200 (``--budget-s``, default 480 s = 8 minutes, enforced: each child gets the
time left as its timeout, and a setting that cannot start or finish in it is reported, not run):

    per setting   process start and imports                      ~15 s
                  random init of 8.3 B parameters on the GPU     ~10 s  (+ ~5 s reference copy, full FT)
                  1 warm-up step, 32 completion tokens             ~5 s
                  3 timed steps x (1,024 decode steps x ~20 ms
                                   + ~3 s reference, policy, AdamW) ~70 s
                  --------------------------------------------------
                                                                  ~100-105 s
    4 settings                                                    ~410 s  < 480 s

The ~20 ms per decode step (transformers' ``generate``, 28 layers, bf16, G rows) is an estimate,
not a measurement: no GPU has run this script yet. At 30 ms a step the fourth setting would not
fit, and the budget guard reports it as not run; ``--groups 8`` or ``--modes full`` narrow the run.

``--trl`` adds, after ours, TRL's ``GRPOTrainer`` step (``_trl_gpu_step.py``, a process per G) on the same
random weights (same folder and seed through our loader), data and LoRA setting, for each G: one
warm-up step (at the full length: TRL fixes it per run) and ``--steps`` timed ones; it reports step
time, completion tokens/s and peak memory (no phases). LoRA only: TRL's full fine-tuning loads its
reference with ``from_pretrained``, which would need the 16 GB of random weights on disk first. It
does not fit the 8 minutes beside our 4 settings; ``--trl --modes lora --groups 8`` does (ours ~105 s
+ TRL ~15 s start + ~10 s init + 4 x ~30 s steps ~ 4.5 min). Needs ``trl`` and ``datasets``.

``--dry-run`` swaps in the embedded tiny architecture and its 1,024-id vocabulary (sampling over Qwen's
152k ids costs seconds per token on a loaded CPU), float32, CPU, 112x112 images and 8-token
completions, with the same processes, warm-up, timed steps and phases; the suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from torch.utils.data import DataLoader
from transformers import GenerationConfig, Qwen2_5_VLConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _phases import LOGGED, PHASES, LengthSchedule, PhaseClock  # noqa: E402
from _settings import read_records  # noqa: E402
from grpo_vs_trl import make_records  # noqa: E402

from pathvlm_lightning.backbone import Backbone, LoraOptions  # noqa: E402
from pathvlm_lightning.backbone.families.qwen import QWEN_SPECIAL_TOKENS  # noqa: E402
from pathvlm_lightning.backbone.tiny import build_tiny_config, build_tiny_processor  # noqa: E402
from pathvlm_lightning.backbone.vocab import build_processor, qwen2_5_vl_spec  # noqa: E402
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback, RolloutCallback  # noqa: E402
from pathvlm_lightning.data.collate import PromptCollator  # noqa: E402
from pathvlm_lightning.data.datamodule import RecordDataset  # noqa: E402
from pathvlm_lightning.grpo.losses import GRPOLoss  # noqa: E402
from pathvlm_lightning.modules import GRPOModule  # noqa: E402

PAPER_MAX_PIXELS = 1003520  # configs/grpo.yaml; an 896x896 image fits unchanged: 64x64 patches, 1,024 tokens


def qwen2_5_vl_7b_config(special_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's published shape: 28 x 3,584 text layers (GQA 28/4), 32 x 1,280 vision blocks."""
    text_config = {
        "vocab_size": 151936,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def write_architecture(folder: Path, dry_run: bool) -> Path:
    """config.json + generation config + processor, no weights: Qwen's vocabulary and the 7B shape, or
    (``dry_run``) the embedded tiny model with its 1,024-id vocabulary (fast sampling on CPU)."""
    if dry_run:
        processor = build_tiny_processor(min_pixels=56 * 56, max_pixels=112 * 112)
    else:
        processor = build_processor(qwen2_5_vl_spec(), min_pixels=56 * 56, max_pixels=PAPER_MAX_PIXELS)
    tokenizer = processor.tokenizer
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    config = build_tiny_config(tokenizer, "tiny") if dry_run else qwen2_5_vl_7b_config(ids)
    config.save_pretrained(folder)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=ids["<|endoftext|>"]
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_setting(mode: str, group: int, folder: Path, records: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this process: build, warm up, time ``args.steps`` GRPO steps."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    start = time.perf_counter()
    with device:  # initialise the random weights where they will live
        backbone = Backbone(
            model=str(folder),
            dtype="bfloat16" if cuda else "float32",
            attn_implementation="sdpa",
            freeze_vision=True,
            lora=LoraOptions(r=64, alpha=128) if mode == "lora" else None,
            gradient_checkpointing=True,
        )
    build_seconds = time.perf_counter() - start
    params = list(backbone.parameters())
    dataset = RecordDataset(read_records(records))
    collate = PromptCollator(backbone.processor)
    prompt = collate([dataset[0]])["prompt_inputs"]
    rollout = RolloutCallback(num_generations=group, max_new_tokens=args.completion_length,
                              min_new_tokens=args.completion_length)
    reference = ReferenceModelCallback()
    module = GRPOModule(
        backbone,
        rollout,
        [FormatReward(), AccuracyReward()],
        reference,
        optimizer=partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
        loss=GRPOLoss(aggregation="grpo", beta=0.04),
        skip_zero_advantage_steps=False,  # a random model's rewards rarely vary: measure the full step
        log_completions_every_n_steps=0,
    )
    clock = PhaseClock(device, args.warmup)
    clock.wrap(rollout, "generate", "generation")
    clock.wrap(reference, "reference_logprobs", "reference")
    clock.wrap(backbone, "token_logprobs", "policy_forward")
    clock.wrap(module, "manual_backward", "policy_backward")
    # Warm-up steps run the same code with short completions; then the forced length.
    lengths = iter([args.warmup_tokens] * args.warmup + [args.completion_length] * args.steps)
    forced = LengthSchedule(rollout, lengths)
    trainer = Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-true" if cuda else "32-true",
        callbacks=[forced, clock],  # the rollout, rewards and reference are the module's
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    trainer.fit(module, train_dataloaders=loader)
    return summarise(mode, group, clock.steps, {
        "pid": os.getpid(),
        "build_seconds": build_seconds,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "prompt_tokens": int(prompt["input_ids"].shape[1]),
        "sharing_mode": backbone.sharing_mode({k: v.to(device) for k, v in prompt.items()}),
        "attn_implementation": backbone.hf_model.config.get_text_config()._attn_implementation,
        "precision": trainer.precision,
    })


def summarise(mode: str, group: int, steps: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """Medians over the timed steps, next to every step's record."""
    timed = [s for s in steps if not s["warmup"]]
    step_s = statistics.median(s["step_seconds"] for s in timed)
    phases = {p: statistics.median(s["phases"][p] for s in timed) for p in (*PHASES, "other")}
    tokens = statistics.median(s["completion_tokens"] for s in timed)
    logged = {name: timed[-1]["logged"][name] for name in LOGGED}
    return {
        "mode": mode,
        "num_generations": group,
        **facts,
        "timed_steps": len(timed),
        "seconds_per_step": step_s,
        "phase_seconds": phases,
        "completion_tokens_per_step": tokens,
        "step_tokens_per_second": tokens / step_s,
        "generation_tokens_per_second": tokens / phases["generation"] if phases["generation"] else None,
        "peak_gpu_memory_gib": timed[-1]["peak_gpu_memory_gib"],
        "logged_last_step": logged,
        "sampler_kl_per_step": [s["logged"]["rollout/sampler_kl"] for s in timed],
        "steps": steps,
    }


def run_children(args: argparse.Namespace, folder: Path, records: Path, tmp: Path) -> dict[str, Any]:
    """Every (mode, G) in its own process, within the time budget; -> {"<mode> G=<g>": result}."""
    started = time.perf_counter()
    results: dict[str, Any] = {}
    settings = [(mode, group) for mode in args.modes for group in args.groups]
    settings += [("trl", group) for group in args.groups if args.trl]  # TRL's side: LoRA only
    for mode, group in settings:
        name = f"trl lora G={group}" if mode == "trl" else f"{mode} G={group}"
        left = args.budget_s - (time.perf_counter() - started)
        if left < args.min_setting_s:
            results[name] = {"error": f"not run: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
            continue
        out = tmp / f"{mode}_{group}.json"
        command = [sys.executable, __file__, "--child", mode, str(group), "--folder", str(folder),
                   "--records", str(records), "--child-output", str(out), *_passed(args)]
        if mode == "trl":
            command = [sys.executable, str(Path(__file__).with_name("_trl_gpu_step.py")), "--group", str(group),
                       "--folder", str(folder), "--records", str(records), "--child-output", str(out),
                       "--output-dir", str(tmp / "trl-output"), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--completion-length", str(args.completion_length)]
        env = os.environ.copy()
        if args.dry_run:  # a shared CPU: spinning OpenMP workers wait on descheduled peers (benchmarks/README.md)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            env.setdefault("OMP_NUM_THREADS", "1")
        child_start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after the {left:.0f} s left of the budget"}
            continue
        if done.returncode != 0 or not out.exists():
            results[name] = {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
        else:
            results[name] = json.loads(out.read_text())
        results[name]["process_seconds"] = round(time.perf_counter() - child_start, 1)
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "steps"}}, indent=1), flush=True)
    return results


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a child needs, as arguments."""
    passed = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--warmup-tokens", str(args.warmup_tokens),
              "--completion-length", str(args.completion_length)]
    return passed + (["--dry-run"] if args.dry_run else [])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny architecture, float32, CPU, short completions")
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--groups", nargs="+", type=int, default=[4, 8], help="G values")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (>= 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--warmup-tokens", type=int, default=None, help="completion tokens of a warm-up step (32; dry run 4)")
    parser.add_argument("--completion-length", type=int, default=None, help="forced tokens (1024; dry run 8)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all settings")
    parser.add_argument("--min-setting-s", type=float, default=60.0, help="skip a setting with less time left")
    parser.add_argument("--trl", action="store_true", help="after ours, TRL's GRPO step for each G, LoRA (needs trl)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "G"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error(f"--steps must be >= 3 timed steps, got {args.steps}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py needs a CUDA device; use --dry-run to run the same code on CPU")
    args.completion_length = args.completion_length or (8 if args.dry_run else 1024)
    args.warmup_tokens = args.warmup_tokens or (4 if args.dry_run else 32)
    if args.child:
        if args.dry_run:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = run_setting(args.child[0], int(args.child[1]), args.folder, args.records, args)
        args.child_output.write_text(json.dumps(result, indent=1))
        return result
    started = time.perf_counter()
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "lightning", "peft")},
        "cuda": torch.version.cuda,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_step.") as tmp:
        folder = write_architecture(Path(tmp) / "model", args.dry_run)
        records = make_records(Path(tmp) / "data", args.warmup + args.steps, 112 if args.dry_run else 896, seed=0)
        report["results"] = run_children(args, folder, records, Path(tmp))
    report["wall_seconds"] = time.perf_counter() - started
    report["within_budget"] = report["wall_seconds"] <= args.budget_s
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
