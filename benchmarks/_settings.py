"""What both benchmark children share: the run's settings, the records, and process start-up.

The parent writes one ``settings.json`` into its work folder; each child reads it, so the two sides
cannot drift apart in G, lengths, beta or the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.splits import record_from_json, record_to_json


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run, identical for both sides."""

    model_dir: str  # a saved Qwen2.5-VL + processor folder both sides load
    records_path: str  # JSON lines of VQARecord fields; the images are 448x448 PNGs
    total_steps: int  # warmup + measured optimizer steps
    threads: int  # torch intra-op threads in each child
    num_generations: int = 4  # G
    prompts_per_step: int = 2
    completion_length: int = 64  # min_new_tokens = max_new_tokens
    beta: float = 0.04
    loss_type: str = "grpo"
    epsilon: float = 0.2
    temperature: float = 1.0
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0
    seed: int = 0
    share_prompts: bool = True  # our Backbone's default; False runs G copies of each prompt, as TRL does
    vocab: str = "small"  # the embedded tokenizer: "small" (1,024 ids) or "qwen" (151,936 rows)
    gradient_checkpointing: bool = False  # activation checkpointing on both sides (non-reentrant)

    @property
    def completions_per_step(self) -> int:
        return self.num_generations * self.prompts_per_step

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> BenchSettings:
        return cls(**json.loads(Path(path).read_text()))


def write_records(records: list[VQARecord], path: Path) -> None:
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in records))


def read_records(path: str | Path) -> list[VQARecord]:
    return [record_from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line]


def child_start(description: str) -> tuple[BenchSettings, int]:
    """Parse a child's arguments, seed every RNG and set the thread count; -> (settings, report fd)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--settings", required=True, help="settings.json written by grpo_vs_trl.py")
    parser.add_argument("--report-fd", type=int, required=True, help="inherited pipe for JSON-line reports")
    args = parser.parse_args()
    settings = BenchSettings.load(args.settings)
    torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    return settings, args.report_fd
