"""Small on-disk datasets for the data tests (helpers only; no tests here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from pathvlm_lightning.data.records import VQARecord

OPTION_TEXTS = ("small", "medium", "large", "very large")


def make_image(path: Path, shade: int = 0, size: tuple[int, int] = (56, 56)) -> Path:
    """A PNG whose colour depends on ``shade`` (so different images differ in content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, (3 * shade) % 256, 120)).save(path)
    return path


def pathmmu_rows(folder: Path, n: int, questions_per_image: int = 1) -> list[dict[str, Any]]:
    """``n`` canonical rows with images under ``folder/images`` (relative paths), answers cycling A-D."""
    rows = []
    for i in range(n):
        image = f"images/{i // questions_per_image:04d}.png"
        make_image(folder / image, shade=i // questions_per_image)
        letter = "ABCD"[i % 4]
        rows.append(
            {
                "id": f"q{i:03d}",
                "image": image,
                "question": f"How large are the nuclei in tile {i}?",
                "options": dict(zip("ABCD", OPTION_TEXTS)),
                "answer": letter,
                "explanation": f"The nuclei look {OPTION_TEXTS[i % 4]}.",
                "subset": "nuclear_size",
                "modality": "H&E",
            }
        )
    return rows


def vlm_r1_rows(folder: Path, n: int) -> list[dict[str, Any]]:
    """The same questions in the VLM-R1 shape: options inside ``problem``, tags inside ``solution``."""
    rows = []
    for row in pathmmu_rows(folder, n):
        options = "\n".join(f"{k}) {v}" for k, v in row["options"].items())
        answer = f"{row['answer']}) {row['options'][row['answer']]}"
        rows.append(
            {
                "id": row["id"],
                "image": row["image"],
                "problem": f"{row['question']}\nOptions:\n{options}",
                "solution": f"<think>{row['explanation']}</think><answer>{answer}</answer>",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record(record_id: str, image: str, answer: str = "B", explanation: str = "Dark nuclei.") -> VQARecord:
    return VQARecord(
        id=record_id,
        image=image,
        question="How large?",
        options={"A": "small", "B": "large"},
        answer=answer,
        explanation=explanation,
    )
