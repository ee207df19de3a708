"""Bad input: each problem raises with file, record and problem named, or is skipped and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from pathvlm_lightning.data.loaders import load_records
from pathvlm_lightning.data.splits import SplitManifest, read_split
from pathvlm_lightning.data.validation import DataValidationError, validate_records
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
