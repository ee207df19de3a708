"""Loaders: every file format and record style gives the same VQARecords."""

from __future__ import annotations

import doctest
import io
import json

import datasets
import pytest
from PIL import Image

from pathvlm_lightning.data.loaders import FieldMap, load_records, parse_options, resolve_answer
from pathvlm_lightning.data.validation import DataValidationError, InvalidRecord
from tests.test_data_support import make_image, pathmmu_rows, vlm_r1_rows, write_jsonl


def test_pathmmu_jsonl_resolves_images_and_fields(tmp_path):
    rows = pathmmu_rows(tmp_path, 3)
    rows[0]["extra"] = {"spec": {"size": 2}}
    records, report = load_records(write_jsonl(tmp_path / "data.jsonl", rows))
    assert (report.seen, report.kept, report.num_skipped) == (3, 3, 0)
    first = records[0]
    assert first.id == "q000"
    assert first.image == str(tmp_path / "images" / "0000.png")  # relative to the data file's folder
    assert first.options == {"A": "small", "B": "medium", "C": "large", "D": "very large"}
    assert [r.answer for r in records] == ["A", "B", "C"]
    assert first.explanation == "The nuclei look small."
    assert (first.subset, first.modality) == ("nuclear_size", "H&E")
    assert first.extra == {"spec": {"size": 2}}
    assert records[1].extra == {}


def test_json_list_parquet_and_saved_folder_agree(tmp_path):
    rows = pathmmu_rows(tmp_path, 4)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for image in (tmp_path / "images").iterdir():  # the saved folder resolves images from itself
        make_image(tmp_path / "saved" / "images" / image.name, shade=int(image.stem))
    from_json = load_records(tmp_path / "data.json").records
    from_parquet = load_records(tmp_path / "data.parquet").records
    from_folder = load_records(tmp_path / "saved").records
    assert from_json == from_parquet
    assert [(r.id, r.options, r.answer) for r in from_folder] == [(r.id, r.options, r.answer) for r in from_json]
    assert from_folder[0].image == str(tmp_path / "saved" / "images" / "0000.png")


def test_option_and_answer_shapes(tmp_path):
    rows = pathmmu_rows(tmp_path, 4)
    rows[0].update(options=["red", "blue", "green", "pink"], answer="green")  # list + answer as text
    rows[1].update(options=["A) red", "B) blue", "C) green"], answer="B) blue")  # labelled list
    rows[2].update(options={"a": "red", "b": "blue"}, answer="b")  # lower-case letters
    rows[3].update(options="A) red\nB) blue", answer="(A)")  # lines in one string
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows)).records
    assert [(r.options, r.answer) for r in records] == [
        ({"A": "red", "B": "blue", "C": "green", "D": "pink"}, "C"),
        ({"A": "red", "B": "blue", "C": "green"}, "B"),
        ({"A": "red", "B": "blue"}, "B"),
        ({"A": "red", "B": "blue"}, "A"),
    ]


def test_vlm_r1_style_parses_problem_and_solution(tmp_path):
    rows = vlm_r1_rows(tmp_path, 2)
    records = load_records(write_jsonl(tmp_path / "r1.jsonl", rows), style="vlm_r1").records
    assert records[1].question == "How large are the nuclei in tile 1?"
    assert records[1].options == {"A": "small", "B": "medium", "C": "large", "D": "very large"}
    assert records[1].answer == "B"
    assert records[1].explanation == "The nuclei look medium."


def test_omnimedvqa_shape_through_field_map(tmp_path):
    make_image(tmp_path / "ct.png")
    row = {
        "question_id": "omni-1",
        "image_path": "ct.png",
        "question": "Which organ is shown?",
        "option_A": "liver",
        "option_B": "lung",
        "option_C": "kidney",
        "option_D": None,
        "gt_answer": "lung",
        "modality_type": "CT",
    }
    field_map = {
        "id": "question_id",
        "image": "image_path",
        "options": ["option_A", "option_B", "option_C", "option_D"],
        "answer": "gt_answer",
        "modality": "modality_type",
    }
    (record,) = load_records(write_jsonl(tmp_path / "omni.jsonl", [row]), field_map=field_map).records
    assert (record.id, record.options, record.answer, record.modality) == (
        "omni-1",
        {"A": "liver", "B": "lung", "C": "kidney"},  # the empty option_D is left out
        "B",
        "CT",
    )


def test_embedded_image_bytes_are_written_once_by_content(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    rows = [
        {"id": f"q{i}", "image": {"bytes": buffer.getvalue(), "path": None}, "question": "Colour?",
         "options": ["red", "blue"], "answer": "red"}
        for i in range(2)
    ]
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "embedded.parquet"))
    with pytest.raises(ValueError, match="image_dir"):
        load_records(tmp_path / "embedded.parquet")
    records = load_records(tmp_path / "embedded.parquet", image_dir=tmp_path / "cache").records
    assert records[0].image == records[1].image  # same bytes -> same file -> same image group
    assert records[0].image.startswith(str(tmp_path / "cache")) and records[0].image.endswith(".png")
    assert Image.open(records[0].image).getpixel((0, 0)) == (255, 0, 0)


def test_missing_id_column_gives_row_ids_and_image_root(tmp_path):
    rows = pathmmu_rows(tmp_path / "elsewhere", 2)
    for row in rows:
        del row["id"]
    records = load_records(write_jsonl(tmp_path / "noid.jsonl", rows), image_root=tmp_path / "elsewhere").records
    assert [r.id for r in records] == ["noid-0", "noid-1"]
    assert records[0].image == str(tmp_path / "elsewhere" / "images" / "0000.png")


def test_mapping_mistakes_raise_at_once(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pathmmu_rows(tmp_path, 2))
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['gt_answer'\]"):
        load_records(path, field_map={"answer": "gt_answer"}, on_invalid="skip")
    with pytest.raises(ValueError, match=r"unknown fields \['answers'\]"):
        load_records(path, field_map={"answers": "answer"})
    with pytest.raises(ValueError, match="record_style"):
        load_records(path, style="pathvqa")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_field_map_defaults_per_style():
    assert FieldMap.for_style("vlm_r1").question == "problem"
    assert FieldMap.for_style("vlm_r1", {"image": "img"}).image == "img"
    assert FieldMap.for_style("pathmmu").options == "options"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("E", "not one of the options"),
        ("B) small", "names option B but option B is 'large'"),
        ("huge", "not one of the options"),
    ],
)
def test_resolve_answer_rejects(answer, message):
    with pytest.raises(InvalidRecord, match=message) as caught:
        resolve_answer(answer, {"A": "small", "B": "large"})
    assert caught.value.kind == "answer_not_in_options"


def test_resolve_answer_accepts_text_case_and_spacing():
    assert resolve_answer("  Very   LARGE ", {"A": "small", "B": "very large"}) == "B"
    assert resolve_answer("B.  very large", {"A": "small", "B": "very large"}) == "B"


def test_parse_options_rejects_bad_shapes():
    with pytest.raises(InvalidRecord, match="not of the form"):
        parse_options("A) red\nblue")
    with pytest.raises(InvalidRecord, match="not a letter"):
        parse_options({"first": "red"})
    with pytest.raises(InvalidRecord, match="appears twice"):
        parse_options("A) red\nA) blue")


def test_vlm_r1_options_inline_in_the_problem(tmp_path):
    """Med-R1's conversions: options inline after the question, no 'Options:' line, a bare letter answer."""
    make_image(tmp_path / "ct.png")
    rows = [
        {"image": "ct.png", "solution": "<answer> C </answer>",
         "problem": "What imaging technique is employed for obtaining this image? A)Mammogram, "
                    "B)Positron emission tomography (PET), C)CT, D)Fluoroscopy"},
        {"image": "ct.png", "solution": "<think>Bright bone.</think><answer>B) X-ray</answer>",
         "problem": "Which modality is this?\nOptions: A) MRI, B) X-ray"},  # one inline line after the header
        {"image": "ct.png", "solution": "<answer>A</answer>", "problem": "Is a lesion visible? Yes or no."},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "med_r1.jsonl", rows)
    records, report = load_records(path, style="vlm_r1", on_invalid="skip")
    first, second = records
    assert first.question == "What imaging technique is employed for obtaining this image?"
    assert first.options == {"A": "Mammogram", "B": "Positron emission tomography (PET)", "C": "CT", "D": "Fluoroscopy"}
    assert (first.answer, first.explanation, first.id) == ("C", "", "med_r1-0")
    assert (second.question, second.options, second.answer) == ("Which modality is this?", {"A": "MRI", "B": "X-ray"}, "B")
    assert dict(report.skipped) == {"bad_options": 1}
    assert "record 'med_r1-2' (row 2): problem text has neither an 'Options:' line nor inline options" in report.messages[0]


def test_option_parsing_doctests_pass():
    from pathvlm_lightning.data import options

    result = doctest.testmod(options)
    assert result.attempted >= 7 and result.failed == 0
