"""Bad input: each problem raises with file, record and problem named, or is skipped and counted."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.loaders import load_records
from pathvlm_lightning.data.splits import SplitManifest, read_split
from pathvlm_lightning.data.validation import DataValidationError, RecordChecks, special_tokens_of, validate_records
from tests.test_data_support import make_image, pathmmu_rows, record, write_jsonl


def _missing_image(rows: list[dict], folder: Path) -> None:
    rows[1]["image"] = "images/absent.png"


def _corrupt_image(rows: list[dict], folder: Path) -> None:
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    rows[1]["image"] = "images/broken.png"


def _truncated_jpeg(rows: list[dict], folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64), "purple").save(folder / "images" / "cut.jpg", quality=90)
    data = (folder / "images" / "cut.jpg").read_bytes()
    (folder / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])  # the header survives, the scan does not
    rows[1]["image"] = "images/cut.jpg"


def _missing_question(rows: list[dict], folder: Path) -> None:
    rows[1]["question"] = None


def _answer_not_an_option(rows: list[dict], folder: Path) -> None:
    rows[1]["answer"] = "E"


def _duplicate_id(rows: list[dict], folder: Path) -> None:
    rows[1]["id"] = rows[0]["id"]


def _one_option(rows: list[dict], folder: Path) -> None:
    rows[1]["options"] = {"A": "small"}
    rows[1]["answer"] = "A"


CASES: list[tuple[Callable, str, str]] = [
    (_missing_image, "missing_image", "absent.png' does not exist"),
    (_corrupt_image, "corrupt_image", "broken.png' cannot be read"),
    (_truncated_jpeg, "corrupt_image", "cut.jpg' cannot be read"),
    (_missing_question, "missing_field", "no value in column 'question'"),
    (_answer_not_an_option, "answer_not_in_options", "answer 'E' is not one of the options"),
    (_duplicate_id, "duplicate_id", "duplicate id 'q000' (first seen at row 0)"),
    (_one_option, "too_few_options", "has 1 option(s)"),
]


def _bad_file(tmp_path: Path, spoil: Callable) -> Path:
    rows = pathmmu_rows(tmp_path, 3)
    spoil(rows, tmp_path)
    return write_jsonl(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize(("spoil", "kind", "detail"), CASES, ids=[c[1] + ":" + c[0].__name__ for c in CASES])
def test_error_names_file_record_and_problem(tmp_path, spoil, kind, detail):
    path = _bad_file(tmp_path, spoil)
    with pytest.raises(DataValidationError) as caught:
        load_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    record_id = "q000" if kind == "duplicate_id" else "q001"
    assert f"record '{record_id}' (row 1)" in message
    assert detail in message
    assert caught.value.kind == kind


@pytest.mark.parametrize(("spoil", "kind", "detail"), CASES, ids=[c[1] + ":" + c[0].__name__ for c in CASES])
def test_skip_counts_and_logs(tmp_path, caplog, spoil, kind, detail):
    path = _bad_file(tmp_path, spoil)
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.data.validation"):
        records, report = load_records(path, on_invalid="skip")
    assert [r.id for r in records] == ["q000", "q002"]  # row 1 left out, the others kept
    assert (report.seen, report.kept, dict(report.skipped)) == (3, 2, {kind: 1})
    assert len(report.messages) == 1 and detail in report.messages[0]
    assert any(detail in message for message in caplog.messages)
    assert f"skipped 1 ({kind}: 1)" in report.summary()


def test_all_records_skipped_is_an_empty_source(tmp_path):
    rows = pathmmu_rows(tmp_path, 2)
    for row in rows:
        row["answer"] = "Z"
    with pytest.raises(DataValidationError, match="no usable records") as caught:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows), on_invalid="skip")
    assert caught.value.kind == "empty_split"


def test_empty_split_file_raises(tmp_path):
    SplitManifest(source="s", seed=0, sizes={"test": None}, counts={"test": 0}).write(tmp_path)
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(DataValidationError, match="split 'test' has no records"):
        read_split(tmp_path, "test")


def test_validate_records_checks_built_records(tmp_path):
    good = record("a", str(make_image(tmp_path / "a.png")))
    bad_answer = record("b", good.image, answer="C")
    kept, report = validate_records([good, bad_answer, good], "built", on_invalid="skip")
    assert kept == [good]
    assert dict(report.skipped) == {"answer_not_in_options": 1, "duplicate_id": 1}


def test_on_invalid_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="'ignore'"):
        load_records(write_jsonl(tmp_path / "d.jsonl", pathmmu_rows(tmp_path, 1)), on_invalid="ignore")


# File-level problems: each raises before any record is read, naming the file and what it holds.
def _rows_json(tmp_path: Path) -> list[dict]:
    return pathmmu_rows(tmp_path, 2)


FILE_CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("latin1.jsonl", lambda d: json.dumps(_rows_json(d)[0]).replace("large", "gro\u00df").encode("latin-1"),
     r"is not UTF-8 text \(byte 0xdf on line 1, offset \d+\); convert it to UTF-8"),
    ("utf16.json", lambda d: json.dumps(_rows_json(d)).encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ("empty.jsonl", lambda d: b"", "is empty"),
    ("blank.json", lambda d: b"\n  \n", "is empty"),
    ("questions.json", lambda d: json.dumps({"questions": _rows_json(d)}).encode(),
     r"expected a list of records \(a JSON list, or one object per line\) but the file is a JSON object with "
     r"key\(s\) 'questions' \(a list of 2\); records wrapped in an object are not unwrapped"),
    ("data.json", lambda d: json.dumps({"data": _rows_json(d), "version": "1.0"}).encode(),
     r"JSON object with key\(s\) 'data' \(a list of 2\), 'version' \(a string\)"),
    ("truncated.json", lambda d: json.dumps(_rows_json(d)).encode()[:-30],
     r"is not valid JSON: .* at line 1, column \d+"),
    ("cut.jsonl", lambda d: "".join(json.dumps(r) + "\n" for r in _rows_json(d)).encode()[:-20],
     "line 2 is not valid JSON: "),
    ("strings.json", lambda d: json.dumps(["q1", "q2"]).encode(), r"row 0 is a JSON string \('q1'\), not an object"),
    ("number.json", lambda d: b"42", "expected a list of records but the file holds a JSON number"),
    ("empty.parquet", lambda d: b"", "is empty"),
    ("broken.parquet", lambda d: b"PAR1 not really", "cannot be read as parquet"),
]


@pytest.mark.parametrize(("name", "content", "detail"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_level_problem_names_the_file(tmp_path, name, content, detail):
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    with pytest.raises(DataValidationError) as caught:
        load_records(path, on_invalid="skip")  # not a record problem: skip does not apply
    assert str(caught.value).startswith(f"{path}: ")
    assert re.search(detail, str(caught.value)), str(caught.value)
    assert caught.value.kind == "bad_file"


def test_json_file_holding_json_lines_and_a_byte_order_mark_are_read(tmp_path):
    rows = pathmmu_rows(tmp_path, 3)
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    ids = ["q000", "q001", "q002"]
    assert [r.id for r in load_records(lines).records] == [r.id for r in load_records(bom).records] == ids


def test_mixed_value_types_across_rows_are_read_row_by_row(tmp_path):
    rows = pathmmu_rows(tmp_path, 2)
    rows[0]["id"] = 7  # a number here, a string in the next row: pyarrow would refuse the whole file
    assert [r.id for r in load_records(write_jsonl(tmp_path / "d.jsonl", rows)).records] == ["7", "q001"]


# Special tokens of the tokenizer in record text: refused (not escaped), naming record, field and token.
SPECIAL_CASES = [
    ("question", lambda row: row.update(question="Which stain? <|image_pad|>"), "question", "<|image_pad|>"),
    ("option", lambda row: row["options"].update(C="large <|video_pad|>"), "option C", "<|video_pad|>"),
    ("explanation", lambda row: row.update(explanation="Dark.<|im_end|> More text"), "explanation", "<|im_end|>"),
    ("demonstration", lambda row: row.update(extra={"demonstration": "<|im_start|>assistant"}),
     "extra.demonstration", "<|im_start|>"),
]


@pytest.mark.parametrize(("case", "spoil", "field", "token"), SPECIAL_CASES, ids=[c[0] for c in SPECIAL_CASES])
def test_special_token_in_text_is_refused(tmp_path, tiny_processor, case, spoil, field, token):
    rows = pathmmu_rows(tmp_path, 3)
    spoil(rows[1])
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    checks = RecordChecks(special_tokens=special_tokens_of(tiny_processor))
    with pytest.raises(DataValidationError) as caught:
        load_records(path, checks=checks)
    assert str(caught.value) == (
        f"{path}: record 'q001' (row 1): {field} contains the tokenizer's special token {token!r}: "
        "remove it from the data"
    )
    assert caught.value.kind == "special_token"
    records, report = load_records(path, checks=checks, on_invalid="skip")
    assert [r.id for r in records] == ["q000", "q002"] and dict(report.skipped) == {"special_token": 1}
    assert len(load_records(path).records) == 3  # without the tokenizer's list, nothing is checked


def test_special_tokens_come_from_the_tokenizer(tiny_processor):
    tokens = special_tokens_of(tiny_processor)
    assert {"<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>"} <= set(tokens)
    assert "<think>" not in tokens and "<answer>" not in tokens  # added but not special: the answer format
    assert special_tokens_of(tiny_processor.tokenizer) == tokens


def test_datamodule_checks_special_tokens_with_its_processor(tmp_path, tiny_processor):
    rows = pathmmu_rows(tmp_path, 4)
    rows[2]["question"] = "Where is <|vision_start|> the lesion?"
    datamodule = VQADataModule(
        data_path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
        split_dir=str(tmp_path / "splits"),
        split_sizes={"sft": 2, "test": None},
        processor=tiny_processor,
    )
    with pytest.raises(DataValidationError, match=r"record 'q002' \(row 2\): question contains the tokenizer's special "
                       r"token '<\|vision_start\|>'"):  # fmt: skip
        datamodule.prepare_data()
