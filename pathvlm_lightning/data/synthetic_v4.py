"""Embedded task v4: a set on which a process reward can matter (issue 20, item 3).

The v3 default (``data/synthetic.py``) stays the default and unchanged; this version is chosen with
``VQADataModule(embedded_version="v4")``. It changes three things, each for a measured reason:

- **Every feature a question depends on is drawn to be seen.** In v3 a 0.9 M-parameter model's
  nuclear density stayed at chance after SFT (34-36 %): density and size both change the dark area.
  Here size also changes the nuclei's shade (enlarged nuclei are hyperchromatic, as in pathology),
  density levels are farther apart in count, nuclei are scattered over the whole tile (so density
  is how much of the tile they cover), and every tile is H&E (stain no longer recolours the nuclei).
  What was measured on the way (SFT 4 epochs, val per type): counts 3-5 / 10-13 / 20-24 / 32-38
  gave size 76 %, density 40 %; closer radii (3.0-5.2) with stronger shades gave density 50 % but
  size 37 %. The explanations keep v3's wording ("about thirty nuclei", "about 14 pixels across"),
  the fixed vocabulary the faithfulness reader knows; the numbers it quotes are v3's.
- **A shortcut that answer-only RL keeps.** On grade tiles density follows size: enlarged tiles are
  crowded with probability :data:`SHORTCUT_AGREEMENT`, tiles that are not enlarged are not crowded
  with the same probability. A chain that judges size alone ("enlarged, so high-grade") is right on
  that share of grade tiles; only naming crowding as well gets the rest. Size and density questions
  draw their tiles with independent, uniform features (their classes stay balanced and density
  cannot be read off size there).
- **Demonstrations that reason from one feature.** :data:`SIZE_ONLY_RATE` of the grade
  demonstrations (``extra["demonstration"]``, ``extra["size_only"] = True``) name nuclear size only;
  they are given only on tiles where size alone is right, so every demonstration still ends on the
  gold answer. ``answer`` and ``explanation`` stay the full two-feature reasoning.

One question per tile (the split is by image either way). Deterministic in ``seed``.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from pathvlm_lightning.data import synthetic_tiles as tiles
from pathvlm_lightning.data.records import DEMONSTRATION_KEY
from pathvlm_lightning.data.synthetic import (
    GRADE_LABELS,
    QUESTION_TYPES,
    OptionOrder,
    _ensure,
    _grade_index,
    _record,
    _write_records,
)
from pathvlm_lightning.data.synthetic_tiles import ARRANGEMENTS, SIZE_GRADES, TileSpec

EMBEDDED_V4_VERSION = "embedded-v4"  # cached folders are keyed by it: bump when drawing or questions change
#: Nucleus count range per density grade (v3: 4-6, 9-12, 16-21, 27-33).
V4_COUNTS = ((2, 3), (8, 10), (18, 22), (36, 44))
#: Mean nucleus radius (px) per size grade, as in v3 (closer radii, 3.0-5.2, left SFT at 37 % on size).
V4_RADII = (2.5, 3.5, 4.9, 6.8)
#: Nucleus colour factor per size grade: enlarged nuclei are darker (hyperchromasia), so size is seen
#: in the shade as well as the diameter.
V4_SHADES = (1.0, 0.8, 0.55, 0.35)
#: Question types and how often each is asked.
V4_TYPES = {"nuclear_size": 0.25, "nuclear_density": 0.25, "grade": 0.5}
#: On grade tiles, P(crowded | enlarged) = P(not crowded | not enlarged): a size-only chain's accuracy.
SHORTCUT_AGREEMENT = 0.8
#: Share of all grade demonstrations that reason from size only (all drawn from the agreeing tiles).
SIZE_ONLY_RATE = 0.6
_SIZE_ONLY_RULES = {0: "Nuclei that are not enlarged look benign", 3: "Enlarged nuclei suggest a high-grade lesion"}
_BY_NAME = {question.name: question for question in QUESTION_TYPES}


def draw_tile_v4(spec: TileSpec, rng: np.random.Generator) -> Image.Image:
    """A 112x112 H&E tile: ``spec``'s nuclei scattered over the whole tile, shaded by size grade."""
    palette = tiles._HE
    canvas = tiles._textured_canvas(palette.background, palette.texture, rng)
    radius = V4_RADII[spec.size_grade] * rng.uniform(0.92, 1.08)
    low, high = V4_COUNTS[spec.density_grade]
    count = int(rng.integers(low, high + 1))
    centres, _ = tiles._arrange("scattered", count, radius, rng)
    colours = tiles._nucleus_colours(spec.stain, count, palette, rng) * V4_SHADES[spec.size_grade]
    for (cy, cx), colour in zip(centres, colours):
        r = radius * rng.uniform(0.9, 1.1)
        elongation = rng.uniform(1.0, 1.3)
        tiles._paint_ellipse(canvas, cy, cx, r * elongation, r / elongation, rng.uniform(0, math.pi), colour)
    return tiles._to_image(canvas, rng, noise=4.0)


def sample_spec_v4(question: str, rng: np.random.Generator) -> TileSpec:
    """Independent uniform size and density, except on grade tiles (density follows size)."""
    size = int(rng.integers(4))
    if question == "grade":
        enlarged = size >= 2
        crowded = enlarged if rng.random() < SHORTCUT_AGREEMENT else not enlarged
        density = 2 * int(crowded) + int(rng.integers(2))
    else:
        density = int(rng.integers(4))
    return TileSpec(stain="H&E", size_grade=size, density_grade=density, arrangement=ARRANGEMENTS[0])


def size_only_demonstration(spec: TileSpec, options: dict[str, str]) -> str | None:
    """A grade chain that names nuclear size only, or None where size alone would be wrong."""
    grade = _grade_index(spec)
    if grade not in _SIZE_ONLY_RULES:
        return None
    answer = GRADE_LABELS[grade]
    letter = next(letter for letter, text in options.items() if text == answer)
    enlarged = "enlarged" if spec.size_grade >= 2 else "not enlarged"
    think = (
        f"The nuclei are {SIZE_GRADES[spec.size_grade]}, so {enlarged}. "
        f"{_SIZE_ONLY_RULES[grade]}, so the answer is {answer}."
    )
    return f"<think>{think}</think><answer>{letter}) {answer}</answer>"


def add_size_only_demonstrations(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Give size-only demonstrations to ``rate`` of all grade records (drawn among those where size
    alone is right, at ``rate / share of such records``). Depends only on ``(seed, id)`` per record."""
    if not 0.0 <= rate <= SHORTCUT_AGREEMENT:
        raise ValueError(f"add_size_only_demonstrations: rate must be in [0, {SHORTCUT_AGREEMENT}], got {rate!r}")
    for record in records:
        if record["subset"] != "grade":
            continue
        written = size_only_demonstration(TileSpec(**record["extra"]["spec"]), record["options"])
        draw = np.random.default_rng([seed, 13, zlib.crc32(record["id"].encode())]).random()
        if written is not None and draw < rate / SHORTCUT_AGREEMENT:
            record["extra"][DEMONSTRATION_KEY] = written
            record["extra"]["size_only"] = True
    return records


def generate_dataset_v4(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int,
    option_order: OptionOrder = "fixed",
    size_only_rate: float = SIZE_ONLY_RATE,
) -> Path:
    """Write ``num_records`` v4 questions (one per tile) and their PNGs; return ``records.jsonl``."""
    if num_records < 1:
        raise ValueError(f"generate_dataset_v4: num_records must be >= 1, got {num_records!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names, weights = list(V4_TYPES), np.array(list(V4_TYPES.values()))
    records = []
    for tile in range(num_records):
        rng = np.random.default_rng([seed, 4, tile])
        question = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        spec = sample_spec_v4(question, rng)
        image = f"images/{tile:06d}.png"
        draw_tile_v4(spec, rng).save(out / image, compress_level=1)
        records.append(
            _record(_BY_NAME[question], spec, rng, f"v4-{tile:06d}", image, spec.modality, asdict(spec), option_order)
        )
    return _write_records(out, add_size_only_demonstrations(records, size_only_rate, seed))


def ensure_embedded_v4_dataset(
    root: str | os.PathLike, seed: int = 0, num_records: int = 6000, option_order: OptionOrder = "fixed"
) -> str:
    """Path of ``<root>/embedded-v4-{option_order}-s{rate}-seed{seed}-n{num_records}/records.jsonl``,
    generated on first use."""
    folder = Path(root) / f"{EMBEDDED_V4_VERSION}-{option_order}-s{SIZE_ONLY_RATE:g}-seed{seed}-n{num_records}"
    return str(_ensure(folder, lambda tmp: generate_dataset_v4(tmp, num_records, seed, option_order=option_order)))
