"""Where a record's image path points on this machine, and whether that is inside the image root.

Released files often carry the paths of the machine they were made on: the VLM-R1 lineage writes
``/home/<user>/PathMMU/images/x.png``. ``image_root`` only anchors *relative* paths, so such a file
is read through ``image_path_map``: path prefixes, as written in the records, replaced by a folder
here (relative to ``image_root``, or absolute), e.g. ``{"/home/x/PathMMU/images": "images"}``.

The map is the one way offered, rather than also guessing a missing file by its base name under
``image_root``: a prefix map says exactly what moved, costs no walk of the image folder, and
cannot pick another image that happens to share a file name (OmniMedVQA repeats names such as
``0001.png`` across its datasets; a wrong image behind a right question would train silently).

Containment is decided on the real path (symbolic links followed, on the root as well), so a link
inside the root that points outside it is refused like any outside path, naming where it leads.
``allow_absolute_image_paths: true`` accepts any path, links included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pathvlm_lightning.data.errors import InvalidRecord


def check_path_map(path_map: Mapping[str, str] | None) -> dict[str, str]:
    """``path_map`` as ``{prefix: replacement}`` with trailing separators dropped; an empty prefix
    or replacement, or a value that is not a string, raises ``ValueError``."""
    checked: dict[str, str] = {}
    for prefix, replacement in (path_map or {}).items():
        if not isinstance(prefix, str) or not isinstance(replacement, str):
            raise ValueError(f"image_path_map maps path prefixes to folders (strings), got {prefix!r}: {replacement!r}")
        key = prefix.rstrip("/\\") or prefix
        if not key.strip() or not replacement.strip():
            raise ValueError(f"image_path_map: empty prefix or replacement in {prefix!r}: {replacement!r}")
        checked[key] = replacement
    return checked


@dataclass
class ImagePaths:
    """Turns the image path written in a record into a path on this machine.

    Args:
        image_root: where relative paths (and relative replacements) start.
        path_map: prefix -> replacement (see :func:`check_path_map`); the longest prefix that
            matches whole path components wins.
        allow_outside: accept a path whose real location is outside ``image_root``.
    """

    image_root: Path
    path_map: dict[str, str] = field(default_factory=dict)
    allow_outside: bool = False
    _real_root: str = field(init=False)

    def __post_init__(self) -> None:
        self.path_map = check_path_map(self.path_map)
        self._real_root = os.path.realpath(self.image_root)

    def resolve(self, written: str) -> str:
        """The normalised path of ``written`` (mapped, then anchored at ``image_root`` when relative);
        raises :class:`InvalidRecord` (``image_outside_root``) when its real path leaves the root."""
        mapped = self._mapped(written)
        given = Path(mapped if mapped is not None else written)
        path = os.path.normpath(given if given.is_absolute() else self.image_root / given)
        if self.allow_outside:
            return path
        real = os.path.realpath(path)
        if _is_under(real, self._real_root):
            return path
        raise InvalidRecord("image_outside_root", self._outside(written, mapped, path, real))

    def _mapped(self, written: str) -> str | None:
        matches = [p for p in self.path_map if written == p or written.startswith((f"{p}/", f"{p}\\"))]
        if not matches:
            return None
        prefix = max(matches, key=len)
        rest = written[len(prefix):].lstrip("/\\")
        return os.path.join(self.image_root, self.path_map[prefix], rest)

    def _outside(self, written: str, mapped: str | None, path: str, real: str) -> str:
        root = str(self.image_root)
        if _is_under(os.path.normpath(path), os.path.normpath(os.path.abspath(self.image_root))) or (
            _is_under(os.path.abspath(path), self._real_root)
        ):
            return (
                f"image path {written!r} is a symbolic link (or passes through one) to {real!r}, outside the "
                f"image root {root!r}; copy the file into the root, set image_root to a folder that holds its "
                "target, or allow_absolute_image_paths: true to accept any path"
            )
        via = f" (mapped by image_path_map to {mapped!r})" if mapped is not None else ""
        if not Path(written).is_absolute() or mapped is not None:
            return (
                f"image path {written!r}{via} leads outside the image root {root!r}; set image_root to a folder "
                "that holds the images, or allow_absolute_image_paths: true to accept any path"
            )
        folder, name = os.path.split(os.path.normpath(written))
        if os.path.exists(path):
            return (
                f"image path {written!r} is outside the image root {root!r}; set image_root to a folder that holds "
                f"it, map its folder into the root with image_path_map: {_example(folder, root, name)}, or "
                "allow_absolute_image_paths: true to accept any path"
            )
        return (
            f"image path {written!r} is absolute, outside the image root {root!r}, and not on this machine (a "
            f"path from the machine the file was made on?); map its folder to where the images are here with "
            f"image_path_map: {_example(folder, root, name)} (the replacement relative to image_root, or absolute)"
        )


def _example(folder: str, root: str, name: str) -> str:
    """``{"<folder>": "<replacement>"}``: ``"."`` when ``name`` lies right in the root."""
    here = "." if os.path.isfile(os.path.join(root, name)) else "<its folder, relative to image_root>"
    return json.dumps({folder: here})


def _is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False
