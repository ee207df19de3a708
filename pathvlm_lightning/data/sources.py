"""Where a question set's rows come from: a file, a saved dataset, a folder of files or a glob.

Releases come in more than one file: OmniMedVQA ships one JSON list per source dataset under
``QA_information/Open-access/``. Reading them file by file, in sorted order, keeps every message
about a record pointing at the file it is in, and makes the order (and so the split) the same on
every machine. Rows are read with the ``datasets`` library, which also decodes embedded images.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets

from pathvlm_lightning.data.validation import DataValidationError

TABLE_SUFFIXES = (".json", ".jsonl", ".parquet")
# What ``save_to_disk`` writes at the top of its folder (a Dataset / a DatasetDict).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_OMNIMEDVQA_QA_FOLDER = "QA_information"


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files ``path`` names, in the order they are read.

    ``path`` is a .json/.jsonl/.parquet file or a ``save_to_disk`` folder (one entry: itself), a
    folder of such files (every one directly inside it, sorted by name; a folder is a saved
    dataset when it has ``dataset_info.json``/``state.json``/``dataset_dict.json``), or a glob
    pattern such as ``release/QA_information/Open-access/*.json`` (the matching files, sorted).
    """
    text = str(path)
    file = Path(path)
    if file.is_dir():
        if any((file / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return [file]
        files = sorted(p for p in file.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"data folder {text!r} holds no {'/'.join(TABLE_SUFFIXES)} files and is not a dataset saved "
                f"with save_to_disk (none of {list(_SAVED_DATASET_MARKERS)} in it)"
            )
        return files
    if file.exists():
        return [file]
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"data pattern {text!r} matches no files")
        return matches
    raise FileNotFoundError(f"data path {text!r} does not exist")


def read_table(path: str | os.PathLike) -> datasets.Dataset:
    """One ``datasets.Dataset`` from a file, a saved dataset, a folder of files or a glob pattern
    (see :func:`source_files`); several files are concatenated in order, columns that some files
    lack being null in their rows."""
    files = source_files(path)
    tables = [read_file(file) for file in files]
    if len(tables) == 1:
        return tables[0]
    columns = list(dict.fromkeys(column for table in tables for column in table.column_names))
    aligned = []
    for table in tables:
        for column in columns:
            if column not in table.column_names:
                table = table.add_column(column, [None] * len(table))
        aligned.append(table.select_columns(columns))
    try:
        return datasets.concatenate_datasets(aligned)
    except ValueError as err:
        raise ValueError(f"the files of {str(path)!r} have columns of different types: {err}") from err


def read_file(file: Path, require_list: bool = False) -> datasets.Dataset:
    """One file or saved-dataset folder; ``require_list``: a .json file must hold a JSON list."""
    if file.is_dir():
        table = datasets.load_from_disk(str(file))
        if isinstance(table, datasets.DatasetDict):
            if len(table) != 1:
                raise ValueError(
                    f"{file} holds the splits {sorted(table)}; point data_path at one of them, e.g. {file / next(iter(table))}"
                )
            table = next(iter(table.values()))
        return table
    suffix = file.suffix.lower()
    if suffix == ".json" and require_list:
        _check_json_list(file)
    if suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(file), split="train")
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(file), split="train")
    raise ValueError(f"data file {str(file)!r}: expected .json, .jsonl, .parquet or a saved dataset folder")


def _check_json_list(file: Path) -> None:
    """Refuse a .json file that is not a JSON list: read as records, an object would become one
    odd row (``{"questions": [...]}``) instead of an error."""
    with open(file, encoding="utf-8-sig") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith("["):
        shown = f"starts with {head[:1]!r}" if head else "is empty"
        raise DataValidationError(
            f"{file}: expected a JSON list of question objects ([{{...}}, ...]) but the file {shown}", "bad_file"
        )


def default_image_root(path: str | os.PathLike, style: str = "pathmmu") -> Path:
    """Where relative image paths start when ``image_root`` is not given: the data file's folder,
    the dataset/data folder itself, or the folder a glob pattern's files share. For
    ``omnimedvqa``, whose ``image_path`` is relative to the release root (``Images/...``), the
    folder above the ``QA_information`` folder the files sit in, when they sit in one."""
    file = Path(path)
    if file.is_dir():
        base = file
    elif file.exists():
        base = file.parent
    else:
        base = Path(os.path.commonpath([str(f.resolve().parent) for f in source_files(path)]))
    base = base.resolve()
    if style == "omnimedvqa":
        for folder in (base, *base.parents):
            if folder.name == _OMNIMEDVQA_QA_FOLDER:
                return folder.parent
    return base
