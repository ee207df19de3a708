"""The built-in synthetic sets: determinism, record validity, answers that can be read off the pixels
with plain numpy thresholds (the honest check that the task is learnable), shared images, the
out-of-domain set, letter corruption, and the atomic, idempotent ``ensure_*`` helpers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathvlm_lightning.data import synthetic
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import (
    OOD_MODALITIES,
    QUESTION_TYPES,
    corrupt_letters,
    demonstration_reference,
    ensure_embedded_dataset,
    ensure_ood_dataset,
    generate_dataset,
    generate_ood_dataset,
)
from pathvlm_lightning.data.synthetic_tiles import DERM_COLOURS, FUNDUS_SPOT_COUNTS, STAIN_CLASSES, TileSpec


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = generate_dataset(tmp_path_factory.mktemp("embedded"), num_records=400, seed=7)
    return path.parent, _read(path)


@pytest.fixture(scope="module")
def ood(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = generate_ood_dataset(tmp_path_factory.mktemp("ood"), per_modality=24, seed=7)
    return path.parent, _read(path)


def _pixels(root: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(root / record["image"]), dtype=np.float64)  # [112, 112, 3]


def _blob_areas(mask: np.ndarray) -> np.ndarray:
    """Pixel count of each 4-connected component of ``mask``: every pixel repeatedly takes the smallest
    label among itself and its neighbours until nothing changes."""
    none = mask.size + 1
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), none)  # [H, W]
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        smallest = np.where(mask, smallest, none)
        if (smallest == labels).all():
            return np.unique(labels[mask], return_counts=True)[1]
        labels = smallest


def _tile_features(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """(median green, brown share of nuclear pixels, median nucleus area, estimated nucleus count)."""
    nuclei = pixels @ np.array([0.299, 0.587, 0.114]) < 140  # backgrounds are > 170, nuclei < 100
    areas = _blob_areas(nuclei)
    median_area = float(np.median(areas[areas >= 4]))  # merged nuclei are a minority: the median resists them
    brown = float((pixels[..., 0] > pixels[..., 2])[nuclei].mean())  # DAB is red over blue, hematoxylin not
    return float(np.median(pixels[..., 1])), brown, median_area, nuclei.sum() / median_area


def _measured_answer(subset: str, pixels: np.ndarray) -> str:
    """The answer a thresholding rule reads from the image. Thresholds sit between the design values:
    H&E background green ~150-196 vs IHC ~211-238; DAB share 20-40% ('partly') vs 75-100% ('mostly');
    nucleus area pi*r^2 = 20, 38, 75, 145 px -> geometric midpoints 27, 54, 105; counts 4-6, 9-12,
    16-21, 27-33 -> cuts 7.5, 14, 24."""
    green, brown, area, count = _tile_features(pixels)
    if subset == "stain":
        if green < 205:
            return "H&E"
        return STAIN_CLASSES[1 + (brown > 0.08) + (brown > 0.6)]
    size = int(np.searchsorted([27, 54, 105], area))
    density = int(np.searchsorted([7.5, 14, 24], count))
    if subset == "nuclear_size":
        return ("small", "medium", "large", "very large")[size]
    if subset == "nuclear_density":
        return ("sparse", "moderate", "dense", "very dense")[density]
    return synthetic.GRADE_LABELS[2 * (size >= 2) + (density >= 2)]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = generate_dataset(tmp_path / "a", num_records=30, seed=3)
    b = generate_dataset(tmp_path / "b", num_records=30, seed=3)
    c = generate_dataset(tmp_path / "c", num_records=30, seed=4)
    assert a.read_bytes() == b.read_bytes()
    images = sorted(p.name for p in (a.parent / "images").iterdir())
    assert images == sorted(p.name for p in (b.parent / "images").iterdir())
    assert all((a.parent / "images" / n).read_bytes() == (b.parent / "images" / n).read_bytes() for n in images)
    assert a.read_bytes() != c.read_bytes()
    assert (a.parent / "images" / images[0]).read_bytes() != (c.parent / "images" / images[0]).read_bytes()


def test_a_smaller_set_is_a_prefix_of_a_larger_one(tmp_path):
    small = generate_dataset(tmp_path / "small", num_records=9, seed=5).read_text().splitlines()
    large = generate_dataset(tmp_path / "large", num_records=25, seed=5).read_text().splitlines()
    assert small == large[:9]


def test_records_are_valid_balanced_and_explained(dataset):
    root, records = dataset
    assert len(records) == 400 and len({r["id"] for r in records}) == 400
    types = {q.name: q for q in QUESTION_TYPES}
    for r in records:
        record = VQARecord(**{**r, "image": str(root / r["image"])})  # the shared record type accepts it
        assert sorted(record.options) == ["A", "B", "C", "D"]
        assert sorted(record.options.values()) == sorted(types[record.subset].classes), record.id
        spec = TileSpec(**r["extra"]["spec"])
        assert record.answer_text == types[record.subset].classes[types[record.subset].answer(spec)], record.id
        assert record.modality == spec.modality
        assert record.explanation.endswith(f"so the answer is {record.answer_text}."), record.id
        assert (root / r["image"]).is_file()
    # 400 records, 4 types, 4 letters: each expected ~100; 60 is > 4 standard deviations (8.7) below.
    assert min(Counter(r["answer"] for r in records).values()) > 60
    assert min(Counter(r["subset"] for r in records).values()) > 60
    assert len({tuple(r["options"].values()) for r in records if r["subset"] == "nuclear_size"}) > 4  # shuffled


def test_every_answer_can_be_read_off_the_image_by_thresholds(dataset):
    root, records = dataset
    wrong = Counter()
    for r in records:
        if _measured_answer(r["subset"], _pixels(root, r)) != r["options"][r["answer"]]:
            wrong[r["subset"]] += 1
    per_type = Counter(r["subset"] for r in records)
    # Rules on a few pixel statistics get nearly all right, so each grade is visible in the image;
    # a blind guess would get 75% wrong. Overlapping nuclei in crowded tiles cost a few percent.
    assert all(wrong[t] <= 0.04 * per_type[t] for t in per_type), (wrong, per_type)


def test_a_share_of_tiles_carries_two_questions_of_different_types(dataset):
    root, records = dataset
    by_image: dict[str, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    shared = [rs for rs in by_image.values() if len(rs) == 2]
    assert max(len(rs) for rs in by_image.values()) == 2
    assert all(rs[0]["subset"] != rs[1]["subset"] for rs in shared)
    # share_fraction 0.3: ~92 of ~308 tiles have two questions; 0.2-0.4 is > 3 standard deviations wide.
    assert 0.2 < len(shared) / len(by_image) < 0.4
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(Path(i).name for i in by_image)


def test_ood_records_cover_each_modality_with_balanced_readable_answers(ood):
    root, records = ood
    assert Counter(r["modality"] for r in records) == {m: 24 for m in OOD_MODALITIES}
    for r in records:
        question = OOD_MODALITIES[r["modality"]][0]
        assert sorted(r["options"].values()) == sorted(question.classes) and r["subset"] == question.name
        assert r["options"][r["answer"]] == question.classes[r["extra"]["spec"]["class_index"]]
        pixels = _pixels(root, r)
        if r["modality"] == "synthetic-CT":
            # nodule areas pi*r^2 = 20, 64, 154, 346 px; the cuts are their geometric midpoints
            seen = int(np.searchsorted([35, 99, 231], (pixels[..., 0] > 170).sum()))
        elif r["modality"] == "synthetic-dermoscopy":
            skin = np.array([232.0, 190.0, 164.0])
            lesion = pixels[np.linalg.norm(pixels - skin, axis=-1) > 45].mean(axis=0)
            seen = int(np.argmin([np.linalg.norm(lesion - c) for c in DERM_COLOURS.values()]))
        else:
            spots = _blob_areas(pixels[..., 1] > 232).size  # exudates are drawn pale yellow, green 238
            seen = next(g for g, (low, high) in enumerate(FUNDUS_SPOT_COUNTS) if low <= spots <= high)
        assert seen == r["extra"]["spec"]["class_index"], r["id"]
    for modality in OOD_MODALITIES:
        assert len({r["answer"] for r in records if r["modality"] == modality}) == 4  # options are shuffled


def test_corrupt_letters_changes_only_the_demonstration_letter(dataset):
    root, rows = dataset
    records = [VQARecord(**r) for r in rows]
    assert not any(synthetic.TARGET_LETTER_KEY in r.extra for r in corrupt_letters(records, 0.0, seed=1))
    everything = corrupt_letters(records, 1.0, seed=1)
    for clean, noisy in zip(records, everything):
        letter = noisy.extra[synthetic.TARGET_LETTER_KEY]
        assert letter in clean.options and letter != clean.answer
        assert noisy == clean  # answer, options, explanation untouched (extra is not compared)
        assert demonstration_reference(noisy) == f"{letter}) {clean.answer_text}"
    some = corrupt_letters(records, 0.25, seed=1)
    hit = [r.id for r in some if synthetic.TARGET_LETTER_KEY in r.extra]
    assert 0.15 < len(hit) / len(records) < 0.35  # 100 of 400 expected, standard deviation 8.7
    backwards = corrupt_letters(records[::-1], 0.25, seed=1)
    reversed_hit = [r.id for r in backwards if synthetic.TARGET_LETTER_KEY in r.extra]
    assert reversed_hit == hit[::-1]  # a record's fate does not depend on its neighbours
    assert demonstration_reference(records[0]) == records[0].reference
    with pytest.raises(ValueError, match="1.5"):
        corrupt_letters(records, 1.5, seed=1)


def test_ensure_generates_once_and_then_reuses(tmp_path, monkeypatch):
    path = Path(ensure_embedded_dataset(tmp_path, seed=1, num_records=6))
    assert path == tmp_path / "embedded-v3-fixed-t0-v0.6-seed1-n6" / "records.jsonl" and len(_read(path)) == 6
    monkeypatch.setattr(synthetic, "generate_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_embedded_dataset(tmp_path, seed=1, num_records=6) == str(path)
    ood_path = Path(ensure_ood_dataset(tmp_path, seed=1, per_modality=2))
    assert ood_path.parent.name == "ood-v1-fixed-seed1-n2" and len(_read(ood_path)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded-v3-fixed-t0-v0.6-seed1-n6", "ood-v1-fixed-seed1-n2"]


def test_a_crash_during_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(out_dir, *args, **kwargs):
        (Path(out_dir) / "images").mkdir()
        (Path(out_dir) / "records.jsonl").write_text("{}\n")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate_dataset", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_dataset(tmp_path, seed=0, num_records=5)
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_finishes_first_wins_the_race(tmp_path, monkeypatch):
    final = tmp_path / "embedded-v3-fixed-t0-v0.6-seed0-n5"

    def slower(out_dir, *args, **kwargs):
        final.mkdir()  # another process renamed its finished dataset into place meanwhile
        (final / "records.jsonl").write_text("theirs\n")
        (Path(out_dir) / "records.jsonl").write_text("ours\n")

    monkeypatch.setattr(synthetic, "generate_dataset", slower)
    assert Path(ensure_embedded_dataset(tmp_path, seed=0, num_records=5)).read_text() == "theirs\n"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_a_foreign_folder_in_the_way_is_reported(tmp_path):
    (tmp_path / "embedded-v3-fixed-t0-v0.6-seed0-n5" / "notes").mkdir(parents=True)
    with pytest.raises(OSError, match="embedded-v3-fixed-t0-v0.6-seed0-n5"):
        ensure_embedded_dataset(tmp_path, seed=0, num_records=5)


@pytest.mark.parametrize(
    ("fields", "bad"),
    [({"stain": "PAS"}, "'PAS'"), ({"size_grade": 4}, "size_grade must be 0-3, got 4"), ({"arrangement": "x"}, "'x'")],
)
def test_tile_spec_rejects_unknown_values(fields, bad):
    valid = {"stain": "H&E", "size_grade": 0, "density_grade": 0, "arrangement": "sheet"}
    with pytest.raises(ValueError, match=bad.replace("(", r"\(")):
        TileSpec(**{**valid, **fields})


def test_fixed_option_order_changes_only_the_letters(tmp_path):
    shuffled = _read(generate_dataset(tmp_path / "s", 40, seed=3))
    fixed = _read(generate_dataset(tmp_path / "f", 40, seed=3, option_order="fixed"))
    for s, f in zip(shuffled, fixed):
        assert (s["id"], s["image"], s["options"][s["answer"]]) == (f["id"], f["image"], f["options"][f["answer"]])
        question = next(q for q in synthetic.QUESTION_TYPES if q.name == f["subset"])
        assert list(f["options"].values()) == list(question.classes)  # the classes' own order, A first
    assert (tmp_path / "s" / "images" / "000000.png").read_bytes() == (tmp_path / "f" / "images" / "000000.png").read_bytes()
    assert any(list(s["options"].values()) != list(f["options"].values()) for s, f in zip(shuffled, fixed))


def _grade_records(tmp_path: Path, rate: float) -> list[dict]:
    path = synthetic.generate_dataset(tmp_path / f"r{rate}", 160, seed=3, option_order="fixed", teacher_error_rate=rate)
    return _read(path)


def test_teacher_errors_hit_only_hyperplastic_and_high_grade_with_the_enlargement_rule(tmp_path):
    clean, noisy = _grade_records(tmp_path, 0.0), _grade_records(tmp_path, 1.0)
    assert [r["answer"] for r in clean] == [r["answer"] for r in noisy]  # gold answers never change
    assert [r["explanation"] for r in clean] == [r["explanation"] for r in noisy]
    assert not any("demonstration" in r["extra"] for r in clean)
    hit = [r for r in noisy if r["extra"].get("teacher_error")]
    expected = [r for r in noisy if r["subset"] == "grade" and r["options"][r["answer"]] in ("hyperplastic", "high-grade")]
    assert hit == expected and len(hit) > 3
    for r in hit:
        demo = r["extra"]["demonstration"]
        if r["options"][r["answer"]] == "high-grade":  # enlarged and crowded, graded by enlargement alone
            assert ", so enlarged" in demo and ", so crowded" in demo
            assert demo.endswith("Enlarged nuclei indicate atypia, so the answer is atypical.</think><answer>C) atypical</answer>")
        else:  # crowded but not enlarged
            assert "so not enlarged" in demo and ", so crowded" in demo
            assert demo.endswith("look benign, so the answer is benign-appearing.</think><answer>A) benign-appearing</answer>")
        record = VQARecord(**{k: v for k, v in r.items()})
        assert record.demonstration == demo and record.reference != demo.split("<answer>")[1][:-9]


def test_teacher_error_rate_is_a_per_record_draw_and_validated(tmp_path):
    hit = [r["id"] for r in _grade_records(tmp_path, 0.6) if r["extra"].get("teacher_error")]
    eligible = [r["id"] for r in _grade_records(tmp_path, 1.0) if r["extra"].get("teacher_error")]
    assert set(hit) < set(eligible) and 0.3 < len(hit) / len(eligible) < 0.9
    assert hit == [r["id"] for r in _grade_records(tmp_path / "again", 0.6) if r["extra"].get("teacher_error")]
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        synthetic.add_teacher_errors([], 1.5, seed=0)


def test_sft_target_imitates_the_demonstration_but_rewards_grade_the_gold_answer(tmp_path):
    from pathvlm_lightning.data.prompt import sft_target
    from pathvlm_lightning.rewards.accuracy import accuracy_reward

    (r,) = [r for r in _grade_records(tmp_path, 1.0) if r["extra"].get("teacher_error")][:1]
    record = VQARecord(**r)
    assert sft_target(record) == r["extra"]["demonstration"]
    assert accuracy_reward(sft_target(record), record.answer, record.options) == 0.0
    clean = VQARecord(**{**r, "extra": {}})
    assert sft_target(clean) == f"<think>{clean.explanation}</think><answer>{clean.reference}</answer>"
    assert accuracy_reward(sft_target(clean), clean.answer, clean.options) == 1.0


def test_verbose_demonstrations_restate_the_question_only_on_grade_records(tmp_path):
    path = synthetic.generate_dataset(tmp_path / "v", 160, seed=3, option_order="fixed", verbose_rate=1.0)
    records = _read(path)
    verbose = [r for r in records if r["extra"].get("teacher_verbose")]
    assert verbose == [r for r in records if r["subset"] == "grade"] and verbose
    for r in verbose:
        demo = r["extra"]["demonstration"]
        preface = demo[len("<think>") : demo.index(r["explanation"])]
        # the preface restates the question and all four options, then the same reasoning and gold answer follow
        assert preface.startswith("The question asks") and all(text in preface for text in r["options"].values())
        assert demo == f"<think>{preface}{r['explanation']}</think><answer>{r['answer']}) {r['options'][r['answer']]}</answer>"
        assert VQARecord(**r).demonstration.startswith("<think>The question asks which description fits the tile best")
    none = _read(synthetic.generate_dataset(tmp_path / "n", 160, seed=3, option_order="fixed", verbose_rate=0.0))
    assert not any("demonstration" in r["extra"] for r in none)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        synthetic.add_verbose_demonstrations([], -0.1, seed=0)


def test_a_verbose_grade_demonstration_does_not_fit_the_demo_budget_but_the_plain_one_does(tmp_path):
    from pathvlm_lightning.backbone.tiny import build_tiny_processor

    tokenizer = build_tiny_processor().tokenizer
    (r,) = [r for r in _read(synthetic.generate_dataset(tmp_path, 40, seed=3, option_order="fixed", verbose_rate=1.0))
            if r["extra"].get("teacher_verbose")][:1]
    clean = f"<think>{r['explanation']}</think><answer>{r['answer']}) {r['options'][r['answer']]}</answer>"
    budget = 64  # configs/demo/*: max_new_tokens and eval_max_new_tokens
    assert len(tokenizer(clean).input_ids) < budget < len(tokenizer(r["extra"]["demonstration"]).input_ids)
