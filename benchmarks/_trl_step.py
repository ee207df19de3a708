"""Benchmark child: TRL's ``GRPOTrainer`` through its public API, on the same model, data and settings.

Started by ``grpo_vs_trl.py``; not meant to be run by hand (needs the ``bench`` extra: ``trl``).
Settings that TRL defaults differently from ours are set explicitly so both sides do the same work:
fp32 (TRL turns bf16 on), activation checkpointing only when the run asks for it (TRL turns it on;
non-reentrant, as ours), a constant learning rate,
no dataset shuffling, and a frozen vision tower (ours freezes it; TRL would train it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from _lockstep import StepGate
from _settings import BenchSettings, child_start, read_records
from pathvlm_lightning.backbone import load_processor
from pathvlm_lightning.data.prompt import build_prompt
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.accuracy import accuracy_reward
from pathvlm_lightning.rewards.format import format_reward


def _text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": text}]``."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def format_score(completions: list, **_: Any) -> list[float]:
    """Our format rule, in TRL's ``reward_funcs`` signature."""
    return [format_reward(_text(c)) for c in completions]


def accuracy_score(completions: list, answer: list[str], options: list[str], **_: Any) -> list[float]:
    """Our accuracy rule, in TRL's ``reward_funcs`` signature (the dataset's columns come as lists)."""
    return [accuracy_reward(_text(c), a, json.loads(o)) for c, a, o in zip(completions, answer, options)]


def _row(record: VQARecord) -> dict[str, Any]:
    """Our prompt text as one user turn; TRL puts the image before the text, as ``build_prompt_messages`` does."""
    with Image.open(record.image) as image:
        rgb = image.convert("RGB")
    return {
        "prompt": [{"role": "user", "content": build_prompt(record)}],
        "image": rgb,
        "answer": record.answer,
        "options": json.dumps(record.options),
    }


class _LockstepCallback(TrainerCallback):
    def __init__(self, gate: StepGate, info: dict[str, Any]) -> None:
        self._gate = gate
        self._info = info

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._gate.ready(self._info)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._gate.step_done()


def _config(settings: BenchSettings, output_dir: Path) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        per_device_train_batch_size=settings.completions_per_step,  # counts completions: B * G
        num_generations=settings.num_generations,
        max_completion_length=settings.completion_length,
        generation_kwargs={"min_new_tokens": settings.completion_length},
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        beta=settings.beta,
        loss_type=settings.loss_type,
        epsilon=settings.epsilon,
        scale_rewards="group",
        num_iterations=1,
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=settings.max_grad_norm,
        max_steps=settings.total_steps,
        shuffle_dataset=False,
        seed=settings.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def main() -> None:
    settings, report_fd = child_start("TRL's GRPO step (benchmark child)")
    gate = StepGate(report_fd, settings.total_steps)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(settings.model_dir, dtype="float32")
    model.model.visual.requires_grad_(False)
    processor = load_processor(settings.model_dir)
    processor.tokenizer.padding_side = "left"
    dataset = Dataset.from_list([_row(r) for r in read_records(settings.records_path)])
    params = list(model.parameters())
    info = {
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[format_score, accuracy_score],
        args=_config(settings, Path(settings.model_dir).parent / "trl-output"),
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[_LockstepCallback(gate, info)],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    gate.finish(
        {
            "completion_length_mean": logged[-1]["completions/mean_length"] if logged else None,
            "loss": logged[-1].get("loss") if logged else None,
        }
    )


if __name__ == "__main__":
    main()
