"""PathMMU's release files read as published: an object of splits (or of subsets of splits).

The fixture has the release's layout: ``data.json`` (``{subset: {split: [records]}}``) with the
images under ``images/``, and a per-subset ``socialpath_mapping.json`` (``{split: [records]}``).
``No`` restarts at 0 in every split, options carry their letter, answers are ``"D) text"`` (one a
bare letter), one question has three options and ``test_tiny`` holds questions of its own (as in
the release: none of its questions is in ``test``), one of them on an image ``test`` also uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.loaders import load_records
from pathvlm_lightning.data.validation import DataValidationError
from tests.test_data_support import make_image

TEXTS = ("Random distribution", "Palisading arrangement", "Rosette formation", "Whorled pattern")


def _record(no: int, image: str, answer: str = "D", options: int = 4, **extra: Any) -> dict[str, Any]:
    letters = "ABCD"[:options]
    return {
        "No": no,
        "img": image,
        "question": f"What pattern do the cells of image {image} show?",
        "options": [f"{letter}) {text}" for letter, text in zip(letters, TEXTS)],
        "answer": answer,
        "explanation": f"The cells of {image} are arranged in a whorl.",
        **extra,
    }


def _labelled(letter: str) -> str:
    return f"{letter}) {TEXTS['ABCD'.index(letter)]}"


def write_release(root: Path) -> Path:
    """The release under ``root``: 9 questions in 4 splits (``PubMed/test_tiny`` among them), all read
    by default."""
    for index in range(7):
        make_image(root / "images" / f"{index:02d}.jpg", shade=30 * index)
    data = {
        "PubMed": {
            "val": [_record(0, "00.jpg", _labelled("D")), _record(1, "00.jpg", "B")],  # a bare letter
            "test": [
                _record(0, "01.jpg", _labelled("A")),
                _record(1, "02.jpg", _labelled("C"), options=3),  # three options
                _record(2, "02.jpg", _labelled("B").lower() + "."),  # the option's text, case and stop aside
            ],
            "test_tiny": [_record(0, "06.jpg", _labelled("C")), _record(1, "01.jpg", _labelled("B"))],
        },
        "EduContent": {"val": [_record(0, "03.jpg", _labelled("B")), _record(1, "04.jpg", _labelled("D"))]},
    }
    (root / "data.json").write_text(json.dumps(data, indent=2))
    social = {
        "val": [_record(0, "05.jpg", _labelled("D"), tw_id="810991493825576961", img_position=2)],
        "test": [_record(0, "05.jpg", _labelled("A"), tw_id="810991493825576961", img_position=2)],
    }
    (root / "socialpath_mapping.json").write_text(json.dumps(social, indent=2))
    return root


def test_release_folder_loads_every_split_by_default(tmp_path, caplog):
    """val, test and test_tiny are all read (test_tiny is part of PathMMU's test set), and the
    records read per split are logged at WARNING, where a CLI run shows them."""
    root = write_release(tmp_path / "PathMMU")
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.data"):
        records, report = load_records(root, style="pathmmu_release")
    assert report.kept_by_part == {
        "data:PubMed/val": 2, "data:PubMed/test": 3, "data:PubMed/test_tiny": 2, "data:EduContent/val": 2,
    }  # fmt: skip
    assert (report.seen, report.kept, report.num_skipped) == (9, 9, 0)
    read = [r for r in caplog.records if "PathMMU release records" in r.getMessage()]
    assert len(read) == 1 and read[0].levelno == logging.WARNING
    assert read[0].getMessage().endswith(
        "read 9 PathMMU release records, by split: data:PubMed/val 2, data:PubMed/test 3, "
        "data:PubMed/test_tiny 2, data:EduContent/val 2"
    )
    assert not any("left out" in m for m in caplog.messages)
    # No restarts in every split; the ids stay unique by carrying file and split
    assert [r.id for r in records] == [
        "data:PubMed/val:0", "data:PubMed/val:1",
        "data:PubMed/test:0", "data:PubMed/test:1", "data:PubMed/test:2",
        "data:PubMed/test_tiny:0", "data:PubMed/test_tiny:1",
        "data:EduContent/val:0", "data:EduContent/val:1",
    ]  # fmt: skip
    assert [r.answer for r in records] == ["D", "B", "A", "C", "B", "C", "B", "B", "D"]
    assert records[0].options == dict(zip("ABCD", TEXTS))
    assert records[3].options == dict(zip("ABC", TEXTS[:3]))
    assert [r.subset for r in records] == ["PubMed"] * 7 + ["EduContent"] * 2
    assert records[0].image == str(root.resolve() / "images" / "00.jpg")
    assert records[5].image == str(root.resolve() / "images" / "06.jpg")
    assert records[0].explanation == "The cells of 00.jpg are arranged in a whorl."
    again = load_records(root / "data.json", style="pathmmu_release").records  # the file itself, read again
    assert again == records


def test_per_subset_mapping_file_and_split_selection(tmp_path, caplog):
    root = write_release(tmp_path / "PathMMU")
    records, report = load_records(root / "socialpath_mapping.json", style="pathmmu_release")
    assert [(r.id, r.subset, r.answer) for r in records] == [
        ("socialpath_mapping:val:0", "socialpath", "D"),
        ("socialpath_mapping:test:0", "socialpath", "A"),
    ]
    assert records[0].image == str(root.resolve() / "images" / "05.jpg")
    # a subset's name selects all its splits, test_tiny included; a full key selects that split only
    subset = load_records(root, style="pathmmu_release", release_splits=["PubMed"]).report
    assert subset.kept_by_part == {"data:PubMed/val": 2, "data:PubMed/test": 3, "data:PubMed/test_tiny": 2}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.data"):
        chosen = load_records(root, style="pathmmu_release", release_splits=["EduContent", "PubMed/test"]).report
    assert chosen.kept_by_part == {"data:PubMed/test": 3, "data:EduContent/val": 2}
    left_out = [r for r in caplog.records if "left out split" in r.getMessage()]
    assert [r.levelno for r in left_out] == [logging.WARNING] * 2
    assert [r.getMessage().split(": ", 1)[1] for r in left_out] == [
        "left out split PubMed/val (2 records): not in release_splits ['EduContent', 'PubMed/test']",
        "left out split PubMed/test_tiny (2 records): not in release_splits ['EduContent', 'PubMed/test']",
    ]
    tiny = load_records(root, style="pathmmu_release", release_splits=["PubMed/test_tiny"]).records
    assert [r.id for r in tiny] == ["data:PubMed/test_tiny:0", "data:PubMed/test_tiny:1"]
    with pytest.raises(DataValidationError, match=r"release_splits \['Atlas'\] match no split; the splits are "
                       r"\['PubMed/val', 'PubMed/test', 'PubMed/test_tiny', 'EduContent/val'\]"):  # fmt: skip
        load_records(root, style="pathmmu_release", release_splits=["PubMed", "Atlas"])
    with pytest.raises(ValueError, match="only apply to record_style 'pathmmu_release'"):
        load_records(root / "data.json", release_splits=["PubMed"])


def test_wrong_shapes_name_the_file_and_the_key(tmp_path):
    root = write_release(tmp_path / "PathMMU")
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([_record(0, "PathMMU/images/00.jpg")]))
    with pytest.raises(DataValidationError, match=rf"{flat}: record_style 'pathmmu_release' .* holds a JSON list; "
                       "use record_style 'pathmmu'"):  # fmt: skip
        load_records(flat, style="pathmmu_release")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataValidationError, match=r"d\.parquet: record_style 'pathmmu_release' reads PathMMU's \.json"):
        load_records(tmp_path / "d.parquet", style="pathmmu_release")
    odd = json.loads((root / "data.json").read_text())
    odd["Atlas"] = "see the website"
    (root / "data.json").write_text(json.dumps(odd))
    with pytest.raises(DataValidationError, match=r"data\.json: key 'Atlas' holds a JSON string; a release file maps"):
        load_records(root, style="pathmmu_release")
    odd["Atlas"] = {"val": [_record(0, "00.jpg")], "test": "later"}
    (root / "data.json").write_text(json.dumps(odd))
    both = r"key 'Atlas' holds a JSON object with key\(s\) 'val' \(a list of 1\), 'test' \(a string\)"
    with pytest.raises(DataValidationError, match=both):
        load_records(root, style="pathmmu_release")


def test_bad_release_record_names_file_split_and_record(tmp_path):
    root = write_release(tmp_path / "PathMMU")
    data = json.loads((root / "data.json").read_text())
    data["PubMed"]["test"][2]["answer"] = "E) Necrosis"
    del data["EduContent"]["val"][1]["No"]
    (root / "data.json").write_text(json.dumps(data))
    with pytest.raises(DataValidationError) as caught:
        load_records(root, style="pathmmu_release")
    assert str(caught.value).startswith(
        f"{root.resolve() / 'data.json'} [PubMed/test]: record 'data:PubMed/test:2' (row 2): answer 'E) Necrosis'"
    )
    records, report = load_records(root, style="pathmmu_release", on_invalid="skip")
    assert dict(report.skipped) == {"answer_not_in_options": 1, "missing_field": 1}
    assert report.kept_by_part == {
        "data:PubMed/val": 2, "data:PubMed/test": 2, "data:PubMed/test_tiny": 2, "data:EduContent/val": 1,
    }  # fmt: skip
    assert any(m.startswith(f"{root.resolve() / 'data.json'} [EduContent/val]: row 1: has no id (column 'No')")
               for m in report.messages)  # fmt: skip


def test_datamodule_trains_from_the_downloaded_folder(tmp_path, tiny_processor, caplog):
    root = write_release(tmp_path / "PathMMU")
    datamodule = VQADataModule(
        data_path=str(root),
        record_style="pathmmu_release",
        split_dir=str(tmp_path / "splits"),
        split_sizes={"sft": 4, "test": None},
        processor=tiny_processor,
        batch_size=2,
    )
    with caplog.at_level(logging.INFO, logger="pathvlm_lightning.data.datamodule"):
        datamodule.prepare_data()
    assert any("kept 9 of 9 records" in m and "data:PubMed/test_tiny 2" in m for m in caplog.messages)
    assert sum(datamodule.manifest.counts.values()) == 9
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and all(r.id.startswith("data:") for r in batch["records"])
