"""The shipped plans' stages read one data file: changing its data line once moves every stage of the
demo and of the paper pipeline to the new data (the plan reads each stage as the CLI resolves it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pathvlm_lightning.pipeline import load_plan

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("plan", "data_file", "old_line"),
    [
        ("configs/demo/pipeline.yaml", "configs/demo/data.yaml", "data_path: embedded\n"),
        ("configs/pipeline.yaml", "configs/data.yaml", "data_path: /path/to/pathmmu.jsonl\n"),
    ],
)
def test_one_data_line_moves_every_stage(plan: str, data_file: str, old_line: str, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    text = Path(data_file).read_text()
    assert text.count(old_line) == 1
    Path(data_file).write_text(text.replace(old_line, "data_path: /data/mine.jsonl\n"))  # the one edit

    loaded = load_plan(plan)  # reads each stage as the CLI resolves it, i.e. what the runner's `--config` runs
    assert len(loaded.stages) == 7
    for stage in loaded.stages.values():
        assert stage.info.data_path == "/data/mine.jsonl", stage.name
    exports = [s.info.export_dir for s in loaded.stages.values() if s.train]
    assert len(set(exports)) == len(exports)  # every trained stage writes its own export
