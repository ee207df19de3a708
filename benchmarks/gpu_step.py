"""GRPO steps of a random Qwen2.5-VL-7B-shaped model at paper settings, on one GPU, as JSON.

    PYTHONPATH=$PWD python benchmarks/gpu_step.py --output gpu_step.json     # one GPU, ~7 min on an H200
    PYTHONPATH=$PWD python benchmarks/gpu_step.py --dry-run                  # the same code on CPU, tiny

Nothing is downloaded: the architecture (Qwen2.5-VL-7B's published dimensions, Qwen's real
151,936-row vocabulary built offline by ``backbone/vocab.py``) is written to a folder with no weights,
which ``Backbone`` initialises at random from the seed (see ``backbone/loading.py``). For each
training mode (LoRA, full fine-tuning) the backbone is built once, in bfloat16 with activation
checkpointing and a frozen vision tower (``configs/grpo.yaml``), then:

- generation speed: one prompt with one 896x896 image (1,024 image tokens), G completions of
  ``--gen-tokens`` forced tokens, with transformers' dynamic and static KV cache -> tokens/s;
- for each G in ``--groups``: ``--steps`` optimizer steps of the real ``GRPOModule`` under
  ``lightning.Trainer`` (rollout of ``--completion-length`` forced tokens, format + accuracy rewards,
  reference pass, loss, backward, clipping, AdamW), one prompt per step -> seconds per step, and the
  peak GPU memory of those steps.

``--dry-run`` swaps in the embedded tiny architecture (still with Qwen's vocabulary), float32, CPU,
112x112 images and 8-token completions; the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader
from transformers import GenerationConfig, Qwen2_5_VLConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _settings import read_records  # noqa: E402
from grpo_vs_trl import make_records  # noqa: E402

from pathvlm_lightning.backbone import Backbone, LoraOptions  # noqa: E402
from pathvlm_lightning.backbone.tiny import QWEN_SPECIAL_TOKENS, build_tiny_config  # noqa: E402
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
    """config.json + generation config + Qwen-vocabulary processor, no weights."""
    spec = qwen2_5_vl_spec()
    processor = build_processor(spec, min_pixels=56 * 56, max_pixels=112 * 112 if dry_run else PAPER_MAX_PIXELS)
    tokenizer = processor.tokenizer
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    config = build_tiny_config(tokenizer, "tiny", spec.vocab_size) if dry_run else qwen2_5_vl_7b_config(ids)
    config.save_pretrained(folder)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=ids["<|endoftext|>"]
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_speed(backbone: Backbone, prompt: dict[str, torch.Tensor], group: int, tokens: int) -> dict[str, Any]:
    """Sampled tokens per second for ``group`` completions of ``tokens`` forced tokens, per KV cache kind."""
    model = backbone.hf_model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt.items() if isinstance(v, torch.Tensor)}
    results: dict[str, Any] = {}
    model.eval()
    for cache in ("dynamic", "static"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        try:
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0,
                    num_return_sequences=group, pad_token_id=backbone.pad_token_id, **extra,
                )
            _sync(device)
            seconds = time.perf_counter() - start
            new = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
            results[cache] = {"seconds": seconds, "new_tokens": new, "tokens_per_second": new / seconds}
        except Exception as error:  # reported in the JSON, not hidden: the other cache kind still runs
            results[cache] = {"error": f"{type(error).__name__}: {error}"}
    model.train()
    return results


class _StepClock(Callback):
    """Wall time of every optimizer step (batch start to batch end) and the peak GPU memory of the steps."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.lengths: list[float] = []
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: GRPOModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: GRPOModule, batch: Any, batch_idx: int) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: GRPOModule, outputs: Any, batch: Any, batch_idx: int):
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.lengths.append(float(trainer.callback_metrics["completion/length_mean"]))


def grpo_steps(backbone: Backbone, records_path: Path, group: int, steps: int, length: int) -> dict[str, Any]:
    """``steps`` GRPO optimizer steps (one prompt, G completions of ``length`` forced tokens each)."""
    cuda = torch.cuda.is_available()
    module = GRPOModule(
        backbone,
        optimizer=partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
        loss=GRPOLoss(aggregation="grpo", beta=0.04),
        skip_zero_advantage_steps=False,  # a random model's rewards rarely vary: measure the full step
        log_completions_every_n_steps=0,
    )
    clock = _StepClock()
    callbacks = [
        RolloutCallback(num_generations=group, max_new_tokens=length, min_new_tokens=length),
        FormatReward(),
        AccuracyReward(),
        ReferenceModelCallback(),
        clock,
    ]
    loader = DataLoader(
        RecordDataset(read_records(records_path)), batch_size=1, collate_fn=PromptCollator(backbone.processor)
    )
    trainer = Trainer(
        max_steps=steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-true" if cuda else "32-true",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    measured = clock.seconds[1:] or clock.seconds  # the first step pays one-time start-up
    loss = float(trainer.callback_metrics["train/loss"])
    return {
        "num_generations": group,
        "completion_length": length,
        "completion_length_seen": clock.lengths,
        "step_seconds_all": clock.seconds,
        "seconds_per_step": statistics.median(measured),
        "completions_per_second": group / statistics.median(measured),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": loss if math.isfinite(loss) else None,
    }


def run_mode(mode: str, folder: Path, records: Path, args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    with device:  # initialise the random weights where they will live
        backbone = Backbone(
            model=str(folder),
            dtype="bfloat16" if cuda else "float32",
            freeze_vision=True,
            lora=LoraOptions(r=64, alpha=128) if mode == "lora" else None,
            gradient_checkpointing=True,
        )
    params = list(backbone.parameters())
    report: dict[str, Any] = {
        "build_seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
    }
    prompt = PromptCollator(backbone.processor)([RecordDataset(read_records(records))[0]])["prompt_inputs"]
    report["prompt_tokens"] = int(prompt["input_ids"].shape[1])
    report["generation"] = {f"G={g}": generation_speed(backbone, prompt, g, args.gen_tokens) for g in args.groups}
    report["grpo"] = {
        f"G={g}": grpo_steps(backbone, records, g, args.steps, args.completion_length) for g in args.groups
    }
    del backbone
    if cuda:
        torch.cuda.empty_cache()
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny architecture, float32, CPU, short completions")
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--groups", nargs="+", type=int, default=[4, 8], help="G values")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per G (the first is not timed)")
    parser.add_argument("--completion-length", type=int, default=None, help="forced tokens (1024; dry run 8)")
    parser.add_argument("--gen-tokens", type=int, default=None, help="tokens per generation probe (256; dry run 8)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py needs a CUDA device; use --dry-run to run the same code on CPU")
    args.completion_length = args.completion_length or (8 if args.dry_run else 1024)
    args.gen_tokens = args.gen_tokens or (8 if args.dry_run else 256)
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_step.") as tmp:
        folder = write_architecture(Path(tmp) / "model", args.dry_run)
        records = make_records(Path(tmp) / "data", args.steps, 112 if args.dry_run else 896, seed=0)
        for mode in args.modes:
            report["modes"][mode] = run_mode(mode, folder, records, args)
            print(json.dumps({mode: report["modes"][mode]}, indent=1), flush=True)
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
