"""Opening record images as the processor needs them, and refusing the ones it cannot take.

Medical images are not all 8-bit RGB: microscope cameras and DICOM exports give 16-bit greyscale,
some TIFFs hold 32-bit floats (0..1, or physical units), PNGs carry alpha, and photos carry an EXIF
orientation. PIL's plain ``convert("RGB")`` clips 16-bit values at 255 (a full-range gradient
keeps two or three grey levels), turns a float image in 0..1 black, drops alpha against black
and ignores the orientation. :func:`load_image` instead applies the EXIF orientation, scales
16-bit, 32-bit integer and float images from their own value range (lowest value -> 0, highest
-> 255; a constant image becomes black; NaN/inf pixels become 0), composites transparency on
white, and returns RGB.

:func:`check_image` runs at validation time, before training: besides a full decode (a truncated
file fails there, not mid-epoch), it refuses images whose size the processor cannot take: an
aspect ratio over :data:`MAX_ASPECT_RATIO` (the Qwen-VL processor raises) or more pixels than
``max_image_pixels`` (a 12000x12000 image costs seconds and gigabytes per batch to decode and
resize, only to be shrunk to the processor's ``max_pixels``), and, given the processor and a
length limit, images whose tokens alone exceed that limit.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pathvlm_lightning.data.errors import InvalidRecord

#: Default ``max_image_pixels``: 4096 x 4096, well above pathology tiles and figure panels.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: Qwen2-VL / Qwen2.5-VL's ``smart_resize`` (transformers, ``image_processing_qwen2_vl.py``) raises
#: for a longer-to-shorter side ratio over 200; tests/test_data_images.py checks the processor agrees.
MAX_ASPECT_RATIO = 200.0
# Modes whose values do not fit in 8 bits: 16-bit and 32-bit integer greyscale, 32-bit float.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def image_tokens(width: int, height: int, image_processor: Any) -> int:
    """How many tokens a Qwen-VL image processor turns a ``width`` x ``height`` image into: the size
    its own ``smart_resize`` picks within its pixel bounds, in merged patches.

    >>> from types import SimpleNamespace
    >>> bounds = SimpleNamespace(shortest_edge=56 * 56, longest_edge=28 * 28 * 256)
    >>> qwen = SimpleNamespace(patch_size=14, merge_size=2, size=bounds)
    >>> image_tokens(56, 56, qwen)  # 4 x 4 patches of 14, merged 2 x 2
    4
    >>> image_tokens(4000, 4000, qwen)  # shrunk to the 256 tokens of max_pixels
    256
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = image_processor.size
    resized_height, resized_width = smart_resize(
        height, width, factor=patch * merge, min_pixels=size.shortest_edge, max_pixels=size.longest_edge
    )
    return (resized_height // patch) * (resized_width // patch) // merge**2


@dataclass(frozen=True)
class ImageLimits:
    """The sizes :func:`check_image` accepts. ``max_pixels`` (width x height of the file; ``None``:
    no limit) is the datamodule's ``max_image_pixels``. With an ``image_processor``, an image that
    alone takes more than ``max_tokens`` tokens (:func:`image_tokens`) is refused too: its prompt
    could never fit the length limit named ``tokens_limit_name``. The text's tokens come on top,
    so the collators still check the whole length."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    max_tokens: int | None = None
    tokens_limit_name: str = "the length limit"
    image_processor: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_image_pixels must be positive or None, got {self.max_pixels!r}")

    def check(self, path: str, width: int, height: int) -> None:
        """Raise :class:`InvalidRecord` when a ``width`` x ``height`` image is outside the limits."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise InvalidRecord(
                "image_too_large",
                f"image file {path!r} is {width}x{height} = {width * height:,} pixels, over max_image_pixels "
                f"{self.max_pixels:,}; downscale it or raise max_image_pixels",
            )
        ratio = max(width, height) / max(1, min(width, height))
        if ratio > self.max_aspect_ratio:
            raise InvalidRecord(
                "bad_aspect_ratio",
                f"image file {path!r} is {width}x{height}, an aspect ratio of {ratio:.1f}; the processor takes "
                f"at most {self.max_aspect_ratio:g}: crop or pad it",
            )
        if self.max_tokens is not None and self.image_processor is not None:
            tokens = image_tokens(width, height, self.image_processor)
            if tokens > self.max_tokens:
                raise InvalidRecord(
                    "too_long",
                    f"image file {path!r} ({width}x{height}) becomes {tokens} image tokens, over "
                    f"{self.tokens_limit_name} {self.max_tokens} before any text; lower the backbone's "
                    f"max_pixels (now {self.image_processor.size.longest_edge:,}) or raise {self.tokens_limit_name}",
                )


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright, in 8-bit RGB: see the module docstring for what is converted how."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        image = _scaled_to_8_bits(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)  # [H, W]
    finite = np.isfinite(values)
    scaled = np.zeros(values.shape, dtype=np.float32)
    if finite.any():
        low, high = float(values[finite].min()), float(values[finite].max())
        if high > low:
            scaled[finite] = (values[finite] - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8: mode "L"


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as upright 8-bit RGB (what the processor expects)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def check_image(path: str, limits: ImageLimits = ImageLimits()) -> None:
    """Raise :class:`InvalidRecord` unless ``path`` is an image within ``limits`` that PIL can fully
    decode and :func:`to_rgb` can convert.

    The size comes from the header, so a too-large image is refused before it is decoded.
    ``verify`` catches broken PNG chunks but not a truncated JPEG, so the image is also decoded;
    ``draft`` lets JPEGs decode at reduced scale, which still reads every byte of the file.
    """
    if not os.path.isfile(path):
        raise InvalidRecord("missing_image", f"image file {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # PIL warns above ~89M pixels; the limits below decide instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:  # PIL's own limit, far above DEFAULT_MAX_IMAGE_PIXELS
        raise InvalidRecord("image_too_large", f"image file {path!r} is refused by PIL: {err}") from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
        raise InvalidRecord("corrupt_image", f"image file {path!r} cannot be read: {err}") from err
    limits.check(path, width, height)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
            to_rgb(image)
    except Exception as err:
        raise InvalidRecord("corrupt_image", f"image file {path!r} cannot be read: {err}") from err
