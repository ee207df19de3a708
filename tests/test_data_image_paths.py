"""Image paths from another machine (``image_path_map``) and the image root checked on real paths
(a symbolic link out of the root is refused by name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pathvlm_lightning.cli import main
from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.loaders import load_records
from pathvlm_lightning.data.validation import DataValidationError
from tests.test_data_support import make_image, vlm_r1_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ELSEWHERE = "/home/someone-else/PathMMU/images"  # the machine the file was written on; not here


def _vlm_r1_with_foreign_paths(data: Path, n: int = 3) -> Path:
    """VLM-R1-style records whose images sit under ``data/images`` here but name ELSEWHERE."""
    rows = vlm_r1_rows(data, n)
    for row in rows:
        row["image"] = f"{ELSEWHERE}/{Path(row['image']).name}"
    assert not Path(ELSEWHERE).exists()
    return write_jsonl(data / "r1.jsonl", rows)


def test_foreign_absolute_paths_are_refused_with_advice_that_works(tmp_path):
    data = tmp_path / "data"
    path = _vlm_r1_with_foreign_paths(data)
    with pytest.raises(DataValidationError) as caught:
        load_records(path, style="vlm_r1", image_root=data / "images")
    message = str(caught.value)
    assert message.startswith(f"{path}: record 'q000' (row 0): image path '{ELSEWHERE}/0000.png' is absolute, "
                              f"outside the image root '{(data / 'images').resolve()}', and not on this machine")
    advice = f'image_path_map: {{"{ELSEWHERE}": "."}}'  # 0000.png lies right in this image_root
    assert advice in message
    # the advice, followed, loads every record
    records = load_records(path, style="vlm_r1", image_root=data / "images", image_path_map={ELSEWHERE: "."}).records
    assert [r.image for r in records] == [str((data / "images" / f"{i:04d}.png").resolve()) for i in range(3)]


def test_image_path_map_relative_absolute_and_longest_prefix(tmp_path):
    data = tmp_path / "data"
    path = _vlm_r1_with_foreign_paths(data)
    expected = [str((data / "images" / f"{i:04d}.png").resolve()) for i in range(3)]
    # relative to image_root (the data file's folder by default); a trailing slash on the prefix is fine
    assert [r.image for r in load_records(path, style="vlm_r1", image_path_map={f"{ELSEWHERE}/": "images"}).records] \
        == expected
    # absolute replacement (still inside the image root)
    absolute = {ELSEWHERE: str((data / "images").resolve())}
    assert [r.image for r in load_records(path, style="vlm_r1", image_path_map=absolute).records] == expected
    # the longest prefix wins; a prefix matches whole folder names only ("/home/someone-else/PathMMU/im" does not)
    nested = {"/home/someone-else": "nowhere", ELSEWHERE: "images", "/home/someone-else/PathMMU/im": "nowhere"}
    assert [r.image for r in load_records(path, style="vlm_r1", image_path_map=nested).records] == expected
    # a map that leads out of the root is refused like any outside path, saying where the map sent it
    with pytest.raises(DataValidationError, match=r"record 'q000' \(row 0\): image path '/home/someone-else/"
                       r"PathMMU/images/0000.png' \(mapped by image_path_map to '.*/data/\.\./0000.png'\) leads "
                       r"outside the image root"):  # fmt: skip
        load_records(path, style="vlm_r1", image_path_map={ELSEWHERE: ".."})
    with pytest.raises(ValueError, match="image_path_map: empty prefix or replacement"):
        load_records(path, style="vlm_r1", image_path_map={ELSEWHERE: " "})


def test_a_symbolic_link_out_of_the_root_is_refused_by_name(tmp_path):
    data = tmp_path / "data"
    rows = vlm_r1_rows(data, 3)
    secret = make_image(tmp_path / "outside" / "private.png", shade=9)
    (data / "images" / "link.png").symlink_to(secret)  # inside the root by name, outside in fact
    (data / "images" / "inside.png").symlink_to(data / "images" / "0000.png")  # a link within the root: fine
    rows[1]["image"] = "images/link.png"
    rows[2]["image"] = "images/inside.png"
    path = write_jsonl(data / "r1.jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        load_records(path, style="vlm_r1")
    assert str(caught.value) == (
        f"{path}: record 'q001' (row 1): image path 'images/link.png' is a symbolic link (or passes through one) "
        f"to '{secret.resolve()}', outside the image root '{data.resolve()}'; copy the file into the root, set "
        "image_root to a folder that holds its target, or allow_absolute_image_paths: true to accept any path"
    )
    records, report = load_records(path, style="vlm_r1", on_invalid="skip")
    assert [r.id for r in records] == ["q000", "q002"] and dict(report.skipped) == {"image_outside_root": 1}
    assert records[1].image == str(data.resolve() / "images" / "inside.png")
    allowed = load_records(path, style="vlm_r1", allow_absolute_image_paths=True).records  # the explicit opt-in
    assert allowed[1].image == str(data.resolve() / "images" / "link.png")


def test_a_root_that_is_itself_a_link_is_fine(tmp_path):
    data = tmp_path / "data"
    path = write_jsonl(data / "r1.jsonl", vlm_r1_rows(data, 2))
    os.symlink(data, tmp_path / "linked")
    records = load_records(path, style="vlm_r1", image_root=tmp_path / "linked").records
    assert [Path(r.image).name for r in records] == ["0000.png", "0001.png"]


def test_image_path_map_is_a_yaml_data_option(tmp_path, capsys, monkeypatch, tiny_processor):
    """Set in a config file as ``data.init_args.image_path_map`` (over the demo SFT stage), shown by
    --print_config, and read by the datamodule: the foreign-path records load and split."""
    data = tmp_path / "data"
    path = _vlm_r1_with_foreign_paths(data, n=4)
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {
        "data_path": str(path), "record_style": "vlm_r1", "image_path_map": {ELSEWHERE: "images"},
        "split_dir": str(tmp_path / "splits"), "split_sizes": {"sft": 2, "test": None}, "val_split": None,
    }}}))  # fmt: skip
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo/sft.yaml", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    init = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert init["image_path_map"] == {ELSEWHERE: "images"}
    datamodule = VQADataModule(**init | {"processor": tiny_processor})
    datamodule.prepare_data()
    assert sum(datamodule.manifest.counts.values()) == 4
    with pytest.raises(ValueError, match="image_path_map maps path prefixes to folders"):
        VQADataModule(data_path=str(path), record_style="vlm_r1", image_path_map={ELSEWHERE: 3})
