"""Where a question set's rows come from: a file, a saved dataset, a folder of files or a glob.

Releases come in more than one file: OmniMedVQA ships one JSON list per source dataset under
``QA_information/Open-access/``. Reading them file by file, in sorted order, keeps every message
about a record pointing at the file it is in, and makes the order (and so the split) the same on
every machine. Each file is read and checked by :mod:`pathvlm_lightning.data.files`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets
import pyarrow

from pathvlm_lightning.data.files import JSON_SUFFIXES, read_source

TABLE_SUFFIXES = (*JSON_SUFFIXES, ".parquet")
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
    """One ``datasets.Dataset`` of the raw rows of a file, a saved dataset, a folder of files or a
    glob pattern (see :func:`source_files`), each file checked as :func:`read_source` does; several
    files are concatenated in order, columns that some files lack being null in their rows."""
    sources = [read_source(file) for file in source_files(path)]
    if len(sources) == 1 and isinstance(sources[0].rows, datasets.Dataset):
        return sources[0].rows
    columns = list(dict.fromkeys(column for source in sources for column in source.columns))
    rows = [{column: row.get(column) for column in columns} for source in sources for row in source.rows]
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError, pyarrow.ArrowException) as err:
        raise ValueError(f"the rows of {str(path)!r} have columns of different types: {err}") from err


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
