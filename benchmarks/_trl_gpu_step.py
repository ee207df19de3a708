"""``gpu_step.py --trl`` child: TRL's ``GRPOTrainer`` on the same random model, data and LoRA setting as ours.

Started by ``gpu_step.py``; not meant to be run by hand (needs ``trl`` and ``datasets``). The model is
built by our loader from the same config-only folder and seed, so its random weights equal our side's;
LoRA only: with adapters TRL's reference is the adapter-disabled base, while its full fine-tuning
would load a reference with ``from_pretrained`` and need the weights on disk. Settings as ours:
bf16 on CUDA (fp32 on CPU), non-reentrant activation checkpointing, r=64 / alpha 128 on the language
model's projections, one prompt x G completions forced to C tokens, temperature 1, top-p 1, top-k
off, beta 0.04, loss ``grpo``, epsilon 0.2, AdamW lr 1e-6 without weight decay, clipping at 1.0, our
format and accuracy rewards. TRL's warm-up step runs at the full length (its completion length is
fixed per run). Step time: ``on_step_begin`` to ``on_step_end``, CUDA synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from _settings import read_records
from _trl_step import _row, accuracy_score, format_score
from pathvlm_lightning.backbone.loading import load_model_and_processor
from pathvlm_lightning.backbone.lora import LoraOptions, language_model_target_regex


class _StepTimes(TrainerCallback):
    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.seconds: list[float] = []
        self.peak_gib: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)
        if self.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--folder", "--records", "--child-output", "--output-dir"):
        parser.add_argument(name, type=Path, required=True)
    for name in ("--group", "--steps", "--warmup", "--completion-length"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with device:  # the same random weights as our side: same folder, seed 0, dtype
        model, processor = load_model_and_processor(
            str(args.folder), seed=0, dtype="bfloat16" if cuda else "float32", attn_implementation="sdpa",
            quantization=None, min_pixels=None, max_pixels=None,
        )
    model.model.visual.requires_grad_(False)
    processor.tokenizer.padding_side = "left"
    lora = LoraOptions(r=64, alpha=128)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=language_model_target_regex(lora.target_modules))
    config = GRPOConfig(
        output_dir=str(args.output_dir),
        use_cpu=not cuda,
        bf16=cuda,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=args.group,  # counts completions: one prompt x G
        num_generations=args.group,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.04, loss_type="grpo", epsilon=0.2, scale_rewards="group", num_iterations=1,
        learning_rate=1e-6, weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=1.0,
        max_steps=args.warmup + args.steps, shuffle_dataset=False, seed=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    times = _StepTimes(device, args.warmup)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[format_score, accuracy_score],
        args=config,
        train_dataset=Dataset.from_list([_row(r) for r in read_records(args.records)]),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[times],
    )
    trainer.train()
    timed = times.seconds[args.warmup :]
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    tokens = args.group * statistics.median(lengths[args.warmup :]) if len(lengths) > args.warmup else None
    step_s = statistics.median(timed)
    result = {
        "side": "trl",
        "trl_version": __import__("trl").__version__,
        "pid": os.getpid(),
        "num_generations": args.group,
        "timed_steps": len(timed),
        "step_seconds_all": times.seconds,
        "seconds_per_step": step_s,
        "completion_tokens_per_step": tokens,
        "step_tokens_per_second": tokens / step_s if tokens else None,
        "peak_gpu_memory_gib": times.peak_gib,
    }
    args.child_output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
