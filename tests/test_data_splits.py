"""Splits: disjoint by image, seeded, exact sizes, written once, re-used, and refused when they differ."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pathvlm_lightning.data.splits import (
    SplitManifest,
    SplitMismatchError,
    assign_splits,
    image_key,
    normalise_sizes,
    prepare_splits,
    read_split,
)
from tests.test_data_support import make_image, record


@pytest.fixture
def grouped(tmp_path):
    """30 records on 16 images: images 0-13 carry 2 questions each, images 14-15 one each."""
    records = []
    for image_index in range(16):
        image = str(make_image(tmp_path / "img" / f"{image_index}.png", image_index))
        for q in range(2 if image_index < 14 else 1):
            records.append(record(f"i{image_index}-q{q}", image))
    return records


def _images(split):
    return {image_key(r) for r in split}


def test_splits_are_disjoint_by_image_and_exact(grouped):
    splits = assign_splits(grouped, {"sft": 12, "rl": 6, "test": None}, seed=3)
    assert [len(s) for s in splits.values()] == [12, 6, 12]  # 30 - 12 - 6 = 12 for the rest
    sft, rl, test = (_images(s) for s in splits.values())
    assert not (sft & rl) and not (sft & test) and not (rl & test)
    assert sorted(r.id for s in splits.values() for r in s) == sorted(r.id for r in grouped)


def test_questions_on_one_image_stay_together(grouped):
    splits = assign_splits(grouped, {"sft": 12, "rl": 6, "test": None}, seed=5)
    where = {r.id: name for name, s in splits.items() for r in s}
    for image_index in range(14):
        assert where[f"i{image_index}-q0"] == where[f"i{image_index}-q1"]


def test_same_seed_same_split_other_seed_other_split(grouped):
    sizes = {"sft": 12, "rl": 6, "test": None}
    first = assign_splits(grouped, sizes, seed=1)
    again = assign_splits(list(reversed(grouped)), sizes, seed=1)  # input order does not matter
    other = assign_splits(grouped, sizes, seed=2)
    ids = lambda splits: {name: sorted(r.id for r in s) for name, s in splits.items()}  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_symlinked_image_counts_as_the_same_image(tmp_path):
    original = make_image(tmp_path / "a.png", 1)
    os.symlink(original, tmp_path / "alias.png")
    records = [record("a", str(original)), record("b", str(tmp_path / "alias.png"))]
    records += [record(f"c{i}", str(make_image(tmp_path / f"c{i}.png", 10 + i))) for i in range(4)]
    for seed in range(5):
        splits = assign_splits(records, {"x": 2, "y": None}, seed=seed)
        where = {r.id: name for name, s in splits.items() for r in s}
        assert where["a"] == where["b"]


def test_too_small_data_says_by_how_much(grouped):
    with pytest.raises(ValueError, match="has 30 records .* need at least 36: 6 too few"):
        assign_splits(grouped, {"sft": 20, "rl": 15, "test": None}, seed=0)
    with pytest.raises(ValueError, match="need at least 31: 1 too few"):
        assign_splits(grouped, {"sft": 30, "test": None}, seed=0)


def test_size_that_images_cannot_fill_exactly(tmp_path):
    image_pairs = []
    for i in range(5):  # every image has two questions, so no split can hold an odd count
        image = str(make_image(tmp_path / f"{i}.png", i))
        image_pairs += [record(f"{i}a", image), record(f"{i}b", image)]
    with pytest.raises(ValueError, match=r"split 'sft' got 2 of 3 records \(1 short\)"):
        assign_splits(image_pairs, {"sft": 3, "test": None}, seed=0)


def test_size_rules():
    assert normalise_sizes({"sft": 3, "test": -1}) == {"sft": 3, "test": None}
    with pytest.raises(ValueError, match="only one split may take the rest"):
        normalise_sizes({"a": None, "b": -1})
    with pytest.raises(ValueError, match="size 0"):
        normalise_sizes({"a": 0})
    with pytest.raises(ValueError, match="'../x'"):
        normalise_sizes({"../x": 3})


def test_fixed_sizes_without_rest_leave_records_unused(grouped, tmp_path):
    manifest = prepare_splits(grouped, tmp_path / "s", SplitManifest(source="src", seed=0, sizes={"sft": 10}))
    assert manifest.counts == {"sft": 10} and manifest.unused == 20


def test_written_once_then_reused(grouped, tmp_path):
    split_dir = tmp_path / "splits"
    asked = SplitManifest(source="/data/a.jsonl", seed=4, sizes={"sft": 12, "val": 4, "test": None})
    manifest = prepare_splits(grouped, split_dir, asked)
    assert sorted(os.listdir(split_dir)) == ["manifest.json", "sft.jsonl", "test.jsonl", "val.jsonl"]
    on_disk = json.loads((split_dir / "manifest.json").read_text())
    assert on_disk["seed"] == 4 and on_disk["source"] == "/data/a.jsonl"
    assert on_disk["counts"] == {"sft": 12, "val": 4, "test": 14} and on_disk["unused"] == 0
    assert on_disk["fingerprint"] == manifest.fingerprint and len(manifest.fingerprint) == 64
    sft = read_split(split_dir, "sft")
    assert len(sft) == 12 and all(os.path.isabs(r.image) for r in sft)
    # a second run with the same settings reads the same files instead of re-splitting
    (split_dir / "sft.jsonl").write_text((split_dir / "sft.jsonl").read_text())  # same content, new mtime
    mtime = os.path.getmtime(split_dir / "sft.jsonl")
    again = prepare_splits(list(reversed(grouped)), split_dir, asked)
    assert again.counts == manifest.counts
    assert os.path.getmtime(split_dir / "sft.jsonl") == mtime
    assert read_split(split_dir, "sft") == sft


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 5}, "seed: 4 on disk, 5 asked"),
        ({"source": "/data/b.jsonl"}, "source: '/data/a.jsonl' on disk, '/data/b.jsonl' asked"),
        ({"sizes": {"sft": 10, "val": 4, "test": None}}, "sizes:"),
        ({"sizes": {"val": 4, "sft": 12, "test": None}}, "sizes:"),  # another fill order is another split
    ],
)
def test_mismatch_is_refused(grouped, tmp_path, change, message):
    asked = SplitManifest(source="/data/a.jsonl", seed=4, sizes={"sft": 12, "val": 4, "test": None})
    prepare_splits(grouped, tmp_path, asked)
    with pytest.raises(SplitMismatchError, match="Choose another split_dir, or delete") as caught:
        prepare_splits(grouped, tmp_path, dataclasses.replace(asked, **change))
    assert message in str(caught.value)


def test_changed_source_records_are_refused(grouped, tmp_path):
    asked = SplitManifest(source="/data/a.jsonl", seed=4, sizes={"sft": 12, "test": None})
    prepare_splits(grouped, tmp_path, asked)
    with pytest.raises(SplitMismatchError, match=r"source record ids \(fingerprint\)"):
        prepare_splits(grouped[:-1], tmp_path, asked)


def test_edited_split_file_is_detected(grouped, tmp_path):
    prepare_splits(grouped, tmp_path, SplitManifest(source="s", seed=0, sizes={"sft": 12, "test": None}))
    lines = (tmp_path / "sft.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "sft.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="holds 11 records but the manifest says 12"):
        read_split(tmp_path, "sft")
    with pytest.raises(ValueError, match=r"split 'rl' is not in .* it has \['sft', 'test'\]"):
        read_split(tmp_path, "rl")
