"""Embedded task v4 (data/synthetic_v4.py): deterministic, the features its questions depend on can be
read off the pixels, grade tiles keep a size-only shortcut, 60 % of grade demonstrations take it (and
stay right), and the data module picks v4 by config while v3 stays the default."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathvlm_lightning.data import VQADataModule
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import GRADE_LABELS, EMBEDDED_VERSION
from pathvlm_lightning.data.synthetic_tiles import TileSpec
from pathvlm_lightning.data.synthetic_v4 import (
    EMBEDDED_V4_VERSION,
    SHORTCUT_AGREEMENT,
    SIZE_ONLY_RATE,
    generate_dataset_v4,
)
from pathvlm_lightning.eval.faithfulness import score_chain, tile_truth


@pytest.fixture(scope="module")
def v4(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = generate_dataset_v4(tmp_path_factory.mktemp("v4"), num_records=800, seed=3)
    return path.parent, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_deterministic_and_valid(v4, tmp_path):
    folder, rows = v4
    again = generate_dataset_v4(tmp_path, num_records=800, seed=3)
    assert again.read_bytes() == (folder / "records.jsonl").read_bytes()
    assert (tmp_path / rows[5]["image"]).read_bytes() == (folder / rows[5]["image"]).read_bytes()
    assert {row["subset"] for row in rows} == {"nuclear_size", "nuclear_density", "grade"}
    assert len({row["image"] for row in rows}) == len(rows)  # one question per tile
    for row in rows:
        VQARecord(**row)  # valid record


def test_size_and_density_questions_have_balanced_independent_classes(v4):
    _, rows = v4
    for subset, key in (("nuclear_size", "size_grade"), ("nuclear_density", "density_grade")):
        counts = Counter(row["extra"]["spec"][key] for row in rows if row["subset"] == subset)
        assert set(counts) == {0, 1, 2, 3} and min(counts.values()) >= 0.15 * sum(counts.values()), counts
    density_rows = [row["extra"]["spec"] for row in rows if row["subset"] == "nuclear_density"]
    agree = np.mean([(s["size_grade"] >= 2) == (s["density_grade"] >= 2) for s in density_rows])
    assert 0.35 < agree < 0.65  # density questions cannot be answered from size


def test_grade_tiles_keep_a_size_only_shortcut(v4):
    _, rows = v4
    grade = [row["extra"]["spec"] for row in rows if row["subset"] == "grade"]
    agree = np.mean([(s["size_grade"] >= 2) == (s["density_grade"] >= 2) for s in grade])
    assert abs(agree - SHORTCUT_AGREEMENT) < 0.06, agree


def test_size_only_demonstrations_are_right_true_and_name_size_only(v4):
    _, rows = v4
    grade = [row for row in rows if row["subset"] == "grade"]
    size_only = [row for row in grade if row["extra"].get("size_only")]
    assert abs(len(size_only) / len(grade) - SIZE_ONLY_RATE) < 0.07
    for row in size_only:
        record = VQARecord(**row)
        assert record.demonstration.endswith(f"<answer>{record.reference}</answer>")
        score = score_chain(record.demonstration, tile_truth(row["extra"]["spec"]), "grade")
        assert score.claims == score.true_claims == 2 and not score.names_needed, record.demonstration
    for row in grade:  # the full explanations name both features, truly
        score = score_chain(f"<think>{row['explanation']}</think>", tile_truth(row["extra"]["spec"]), "grade")
        assert score.names_needed and score.true_claims == score.claims
        assert row["options"][row["answer"]] == GRADE_LABELS[
            2 * (row["extra"]["spec"]["size_grade"] >= 2) + (row["extra"]["spec"]["density_grade"] >= 2)]


def _pixel_features(path: Path) -> tuple[float, float]:
    """Share of dark pixels and how dark the darkest 0.1 % are (plain numpy, no learning)."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return float((grey < 150).mean()), float(np.percentile(grey, 0.1))


def test_size_and_density_can_be_read_off_the_pixels(v4):
    """Nearest class mean on two pixel statistics, fit on half of the tiles and scored on the other half:
    shade gives the size grade, dark area divided by the area one nucleus of that size covers gives the count."""
    folder, rows = v4
    specs = [TileSpec(**row["extra"]["spec"]) for row in rows]
    feats = np.array([_pixel_features(folder / row["image"]) for row in rows])  # [n, 2]
    half = len(rows) // 2
    size = np.array([s.size_grade for s in specs])
    means = np.array([feats[:half][size[:half] == g, 1].mean() for g in range(4)])
    size_hat = np.abs(feats[:, 1:2] - means[None, :]).argmin(axis=1)
    assert (size_hat[half:] == size[half:]).mean() > 0.95  # measured 0.998
    per_nucleus = np.array([feats[:half][size[:half] == g, 0].mean() for g in range(4)])  # dark share per tile
    density = np.array([s.density_grade for s in specs])
    count_proxy = np.log(feats[:, 0] / per_nucleus[size_hat])
    centres = np.array([count_proxy[:half][density[:half] == g].mean() for g in range(4)])
    density_hat = np.abs(count_proxy[:, None] - centres[None, :]).argmin(axis=1)
    assert (density_hat[half:] == density[half:]).mean() > 0.85  # measured 0.940


def test_data_module_picks_v4_by_config_and_keeps_v3_the_default(tmp_path):
    default = VQADataModule(split_dir=str(tmp_path / "a"), embedded_records=12)
    assert Path(default.records_path()).parent.name.startswith(f"{EMBEDDED_VERSION}-")
    v4 = VQADataModule(split_dir=str(tmp_path / "b"), embedded_records=12, embedded_version="v4")
    path = Path(v4.records_path())
    assert path.parent.name.startswith(f"{EMBEDDED_V4_VERSION}-") and len(path.read_text().splitlines()) == 12
    with pytest.raises(ValueError, match="embedded_version must be 'v3' or 'v4', got 'v5'"):
        VQADataModule(embedded_version="v5")
