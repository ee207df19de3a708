"""OmniMedVQA-style releases: one JSON list per source dataset, answers given as option text.

The release written here has the real layout (``Images/...`` next to
``QA_information/Open-access/<dataset>.json``), real PNGs, and questions with 2, 3 and 4 options;
one file has no ``option_C``/``option_D`` key at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.loaders import FieldMap, load_records, read_table
from pathvlm_lightning.data.validation import DataValidationError
from tests.test_data_support import make_image

CT_FILE = "Chest CT Scan.json"
SKIN_FILE = "ISIC2020.json"


def _ct_rows() -> list[dict[str, Any]]:
    base = {"dataset": "Chest CT Scan", "question_type": "Disease Diagnosis",
            "modality_type": "CT(Computed Tomography)"}  # fmt: skip
    return [
        {  # four options, the answer is the third text
            **base,
            "question_id": "ct-0",
            "question": "What abnormality is seen in this chest CT?",
            "gt_answer": "Adenocarcinoma",
            "image_path": "Images/Chest CT Scan/test/ct0.png",
            "option_A": "Normal",
            "option_B": "Squamous cell carcinoma",
            "option_C": "Adenocarcinoma",
            "option_D": "Large cell carcinoma",
        },
        {  # three options: option_D present but empty
            **base,
            "question_id": "ct-1",
            "question": "Is a lesion visible?",
            "gt_answer": "Yes, in the right lung",
            "image_path": "Images/Chest CT Scan/test/ct1.png",
            "option_A": "No",
            "option_B": "Yes, in the right lung",
            "option_C": "Yes, in the left lung",
            "option_D": "",
        },
        {  # two options: option_C / option_D keys missing from the row
            **base,
            "question_id": "ct-2",
            "question": "Is this image a CT scan?",
            "gt_answer": "yes",  # matched to the option text "Yes" regardless of case
            "image_path": "Images/Chest CT Scan/test/ct0.png",  # a second question on the same image
            "option_A": "No",
            "option_B": "Yes",
        },
    ]


def _skin_rows() -> list[dict[str, Any]]:
    base = {"dataset": "ISIC2020", "question_type": "Lesion Grading", "modality_type": "Dermoscopy"}
    return [  # no row has option_C or option_D: the file has no such columns at all
        {
            **base,
            "question_id": f"isic-{i}",
            "question": "Is this lesion benign or malignant?",
            "gt_answer": answer,
            "image_path": f"Images/ISIC2020/isic{i}.png",
            "option_A": "Benign",
            "option_B": "Malignant",
        }
        for i, answer in enumerate(["Malignant", "Benign"])
    ]


def write_release(root: Path, ct: list[dict] | None = None, skin: list[dict] | None = None) -> Path:
    """The release under ``root``; returns its ``QA_information/Open-access`` folder."""
    for shade, image in enumerate(["Chest CT Scan/test/ct0.png", "Chest CT Scan/test/ct1.png",
                                   "ISIC2020/isic0.png", "ISIC2020/isic1.png"]):  # fmt: skip
        make_image(root / "Images" / image, shade=40 * shade)
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / CT_FILE).write_text(json.dumps(_ct_rows() if ct is None else ct, indent=1))
    (qa / SKIN_FILE).write_text(json.dumps(_skin_rows() if skin is None else skin, indent=1))
    return qa


def test_default_field_map_of_the_style():
    fm = FieldMap.for_style("omnimedvqa")
    assert (fm.id, fm.image, fm.question, fm.answer) == ("question_id", "image_path", "question", "gt_answer")
    assert fm.options == ["option_A", "option_B", "option_C", "option_D"]
    assert (fm.explanation, fm.subset, fm.modality, fm.extra) == (None, "question_type", "modality_type", None)
    assert FieldMap.for_style("omnimedvqa", {"modality": "dataset"}).modality == "dataset"


def test_release_folder_gives_records_with_letters_from_answer_text(tmp_path):
    qa = write_release(tmp_path / "release")
    records, report = load_records(qa, style="omnimedvqa")
    assert (report.seen, report.kept, report.num_skipped) == (5, 5, 0)
    assert report.kept_by_part == {"Chest CT Scan": 3, "ISIC2020": 2}
    assert report.summary().endswith("; kept by part: Chest CT Scan 3, ISIC2020 2")
    # files in sorted name order ("Chest ..." before "ISIC..."), rows in file order
    assert [r.id for r in records] == ["ct-0", "ct-1", "ct-2", "isic-0", "isic-1"]
    assert [r.answer for r in records] == ["C", "B", "B", "B", "A"]
    assert [len(r.options) for r in records] == [4, 3, 2, 2, 2]
    assert records[1].options == {"A": "No", "B": "Yes, in the right lung", "C": "Yes, in the left lung"}
    # images are relative to the release root, found above QA_information
    assert records[0].image == str(tmp_path / "release" / "Images" / "Chest CT Scan" / "test" / "ct0.png")
    assert records[2].image == records[0].image
    assert records[3].image == str(tmp_path / "release" / "Images" / "ISIC2020" / "isic0.png")
    assert (records[0].subset, records[0].modality, records[0].explanation) == (
        "Disease Diagnosis", "CT(Computed Tomography)", ""
    )  # fmt: skip
    assert (records[4].subset, records[4].modality) == ("Lesion Grading", "Dermoscopy")


def test_glob_pattern_and_single_file_read_the_same_rows(tmp_path):
    qa = write_release(tmp_path / "release")
    from_folder = load_records(qa, style="omnimedvqa").records
    from_glob = load_records(str(qa / "*.json"), style="omnimedvqa").records
    assert from_glob == from_folder
    only_skin = load_records(qa / SKIN_FILE, style="omnimedvqa").records
    assert only_skin == from_folder[3:]
    table = read_table(qa)  # the raw rows, concatenated; columns missing from a file are null there
    assert len(table) == 5 and table["option_D"] == ["Large cell carcinoma", "", None, None, None]


def test_image_root_can_be_given_when_the_files_moved(tmp_path):
    qa = write_release(tmp_path / "release")
    moved = tmp_path / "elsewhere" / SKIN_FILE
    moved.parent.mkdir()
    shutil.copy(qa / SKIN_FILE, moved)
    with pytest.raises(DataValidationError, match=r"isic0\.png' does not exist"):
        load_records(moved, style="omnimedvqa")  # not under QA_information: images sought next to the file
    records = load_records(moved, style="omnimedvqa", image_root=tmp_path / "release").records
    assert records[0].image == str(tmp_path / "release" / "Images" / "ISIC2020" / "isic0.png")


def _answer_not_an_option(skin: list[dict]) -> None:
    skin[1]["gt_answer"] = "Nevus"


def _ambiguous_answer(skin: list[dict]) -> None:
    skin[1].update(option_A="Benign", option_B="benign ")


def _one_option(skin: list[dict]) -> None:
    skin[1]["option_B"] = ""
    skin[1]["gt_answer"] = "Benign"


def _missing_image(skin: list[dict]) -> None:
    skin[1]["image_path"] = "Images/ISIC2020/absent.png"


def _duplicate_id(skin: list[dict]) -> None:
    skin[1]["question_id"] = "ct-1"  # already used in the other file


BAD_ROWS = [
    (_answer_not_an_option, "answer_not_in_options", "answer 'Nevus' is not one of the options"),
    (_ambiguous_answer, "answer_not_in_options", "answer 'Benign' matches several options ['A', 'B']"),
    (_one_option, "too_few_options", "has 1 option(s)"),
    (_missing_image, "missing_image", "absent.png' does not exist"),
    (_duplicate_id, "duplicate_id", "duplicate id 'ct-1' (first seen at row 1 of "),
]


@pytest.mark.parametrize("corrupt, kind, detail", BAD_ROWS, ids=[c[1] + ":" + c[0].__name__ for c in BAD_ROWS])
def test_bad_row_names_file_record_and_problem(tmp_path, corrupt, kind, detail):
    skin = _skin_rows()
    corrupt(skin)
    qa = write_release(tmp_path / "release", skin=skin)
    with pytest.raises(DataValidationError) as error:
        load_records(qa, style="omnimedvqa")
    record_id = "ct-1" if kind == "duplicate_id" else "isic-1"
    assert error.value.kind == kind
    assert str(error.value).startswith(f"{(qa / SKIN_FILE).resolve()}: record {record_id!r} (row 1): ")
    assert detail in str(error.value)
    if kind == "duplicate_id":
        assert str(error.value).endswith(f"row 1 of {(qa / CT_FILE).resolve()})")


def test_skip_mode_leaves_out_and_counts_each_bad_row(tmp_path):
    ct = _ct_rows()
    ct[2]["gt_answer"] = "Maybe"  # answer_not_in_options
    skin = _skin_rows() + [dict(_skin_rows()[0], question_id=f"isic-{i}") for i in range(2, 5)]
    skin[2].update(option_A="Benign", option_B="BENIGN")  # ambiguous: answer_not_in_options
    skin[3]["image_path"] = "Images/ISIC2020/gone.png"  # missing_image
    skin[4]["question_id"] = "ct-0"  # duplicate_id
    qa = write_release(tmp_path / "release", ct=ct, skin=skin)
    records, report = load_records(qa, style="omnimedvqa", on_invalid="skip")
    assert [r.id for r in records] == ["ct-0", "ct-1", "isic-0", "isic-1"]
    assert (report.seen, report.kept) == (8, 4)
    assert dict(report.skipped) == {"answer_not_in_options": 2, "missing_image": 1, "duplicate_id": 1}
    assert report.source == str(qa.resolve())
    assert [m.split(": ")[0] for m in report.messages] == [str((qa / CT_FILE).resolve())] + [
        str((qa / SKIN_FILE).resolve())
    ] * 3


def test_file_level_mistakes_raise_even_in_skip_mode(tmp_path):
    qa = write_release(tmp_path / "release")
    (qa / "Zzz.json").write_text(json.dumps({"questions": _skin_rows()}))  # an object, not a list
    not_a_list = r"Zzz\.json: expected a list of records .* a JSON object with key\(s\) 'questions' \(a list of 2\)"
    with pytest.raises(DataValidationError, match=not_a_list):
        load_records(qa, style="omnimedvqa", on_invalid="skip")
    no_option_b = [{k: v for k, v in row.items() if k != "option_B"} for row in _skin_rows()]
    (qa / "Zzz.json").write_text(json.dumps(no_option_b))
    with pytest.raises(DataValidationError, match=r"Zzz\.json: missing column\(s\) \['option_B'\]"):
        load_records(qa, style="omnimedvqa", on_invalid="skip")


def test_empty_folder_and_unmatched_pattern_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .json/.jsonl/.parquet files"):
        load_records(tmp_path / "empty", style="omnimedvqa")
    with pytest.raises(FileNotFoundError, match=r"data pattern .*nothing-\*\.json' matches no files"):
        load_records(str(tmp_path / "nothing-*.json"), style="omnimedvqa")


def test_datamodule_serves_a_release_folder_as_a_test_split(tmp_path, tiny_processor):
    qa = write_release(tmp_path / "release")
    datamodule = VQADataModule(
        data_path=str(qa / "*.json"),
        record_style="omnimedvqa",
        split_dir=str(tmp_path / "splits"),
        split_sizes={"test": None},
        train_split="test",
        val_split=None,
        processor=tiny_processor,
        eval_batch_size=5,
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    (batch,) = list(datamodule.test_dataloader())
    assert sorted(r.id for r in batch["records"]) == ["ct-0", "ct-1", "ct-2", "isic-0", "isic-1"]
    assert batch["prompt_inputs"]["input_ids"].shape[0] == 5
    assert (tmp_path / "splits" / "test.jsonl").is_file()
