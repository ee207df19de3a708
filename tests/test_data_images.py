"""Images: wide bit depths, EXIF orientation and alpha converted as stated; sizes the processor
cannot take and paths outside the image root refused at validation, naming file and record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm_lightning.data.collate import PromptCollator
from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.images import MAX_ASPECT_RATIO, ImageLimits, check_image, image_tokens, load_image
from pathvlm_lightning.data.loaders import load_records
from pathvlm_lightning.data.validation import DataValidationError, InvalidRecord, RecordChecks
from tests.test_data_support import make_image, pathmmu_rows, record, write_jsonl


def _grey_levels(image: Image.Image) -> int:
    return len(np.unique(np.asarray(image.convert("L"))))


def test_16_bit_gradient_keeps_its_grey_levels(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 1024).astype(np.uint16), (8, 1))  # [8, 1024], full 16-bit range
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert _grey_levels(Image.open(tmp_path / "g16.png").convert("RGB")) <= 5  # what plain convert keeps
    loaded = load_image(str(tmp_path / "g16.png"))
    assert loaded.mode == "RGB" and loaded.size == (1024, 8)
    assert _grey_levels(loaded) == 256
    # scaled to the image's own range: a 12-bit camera's 100..4000 spans the whole 0..255
    narrow = np.tile(np.linspace(100, 4000, 512).astype(np.uint16), (4, 1))
    Image.fromarray(narrow).save(tmp_path / "g12.png")
    values = np.asarray(load_image(str(tmp_path / "g12.png")))[..., 0]
    assert (values.min(), values.max()) == (0, 255) and len(np.unique(values)) >= 200


def test_float_image_is_scaled_not_black(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32), (4, 1))  # [4, 300] in 0..1
    ramp[0, 0] = np.nan
    Image.fromarray(ramp).save(tmp_path / "f.tiff")
    assert np.asarray(Image.open(tmp_path / "f.tiff").convert("L")).max() <= 1  # plain convert: black
    values = np.asarray(load_image(str(tmp_path / "f.tiff")))[..., 0]
    assert values[1, -1] == 255 and values[1, 0] == 0 and values[0, 0] == 0  # NaN -> 0
    assert len(np.unique(values)) >= 200
    Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32)).save(tmp_path / "flat.tiff")
    assert np.asarray(load_image(str(tmp_path / "flat.tiff"))).max() == 0  # a constant image is black


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red square in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(str(tmp_path / "phone.jpg"))
    assert loaded.size == (20, 40)
    red, green, blue = loaded.getpixel((15, 4))  # the corner is now top-right
    assert red > 200 and blue < 60
    assert loaded.getpixel((4, 4))[2] > 200  # top-left is blue


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((200, 0, 0, 255), (0, 0, 4, 8))  # opaque red left half
    rgba.paste((0, 0, 0, 128), (4, 0, 8, 4))  # half-transparent black
    rgba.save(tmp_path / "a.png")
    loaded = load_image(str(tmp_path / "a.png"))
    assert loaded.getpixel((6, 6)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in loaded.getpixel((6, 1)))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(1, (0, 0, 2, 4))
    palette.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(str(tmp_path / "p.png"))
    assert loaded.getpixel((3, 0)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (10, 200, 10)


def test_aspect_ratio_limit_is_the_processors(tmp_path, tiny_processor):
    """MAX_ASPECT_RATIO is what the Qwen-VL image processor accepts: 200 passes, just over fails."""
    limit = int(MAX_ASPECT_RATIO)
    tiny_processor.image_processor(images=[Image.new("RGB", (2 * limit, 2))], return_tensors="pt")
    with pytest.raises(ValueError, match="aspect ratio"):
        tiny_processor.image_processor(images=[Image.new("RGB", (2 * limit + 2, 2))], return_tensors="pt")
    check_image(str(make_image(tmp_path / "ok.png", size=(2 * limit, 2))))
    with pytest.raises(InvalidRecord, match=r"is 402x2, an aspect ratio of 201\.0; the processor takes at most 200"):
        check_image(str(make_image(tmp_path / "strip.png", size=(2 * limit + 2, 2))))


def _rows_with(tmp_path, image_name: str, size: tuple[int, int]) -> list[dict]:
    rows = pathmmu_rows(tmp_path, 3)
    make_image(tmp_path / "images" / image_name, size=size)
    rows[1]["image"] = f"images/{image_name}"
    return rows


def test_bad_sizes_are_refused_at_validation_or_counted(tmp_path):
    rows = _rows_with(tmp_path, "strip.png", (600, 2))
    make_image(tmp_path / "images" / "big.png", size=(120, 100))
    rows[2]["image"] = "images/big.png"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        load_records(path)
    assert str(caught.value).startswith(f"{path}: record 'q001' (row 1): image file ")
    assert caught.value.kind == "bad_aspect_ratio"
    checks = RecordChecks(image_limits=ImageLimits(max_pixels=10_000))
    records, report = load_records(path, checks=checks, on_invalid="skip")
    assert [r.id for r in records] == ["q000"]
    assert dict(report.skipped) == {"bad_aspect_ratio": 1, "image_too_large": 1}
    assert any("big.png' is 120x100 = 12,000 pixels, over max_image_pixels 10,000" in m for m in report.messages)


def test_datamodule_passes_max_image_pixels(tmp_path, tiny_processor):
    rows = _rows_with(tmp_path, "wide.png", (300, 200))
    kwargs = dict(data_path=str(write_jsonl(tmp_path / "d.jsonl", rows)), split_sizes={"sft": 1, "test": None},
                  processor=tiny_processor)  # fmt: skip
    with pytest.raises(DataValidationError, match=r"record 'q001' \(row 1\): image file .* over max_image_pixels 50,000"):
        VQADataModule(split_dir=str(tmp_path / "a"), max_image_pixels=50_000, **kwargs).prepare_data()
    VQADataModule(split_dir=str(tmp_path / "b"), max_image_pixels=None, **kwargs).prepare_data()
    with pytest.raises(ValueError, match="max_image_pixels must be positive or None, got 0"):
        VQADataModule(split_dir=str(tmp_path / "c"), max_image_pixels=0, **kwargs)


def test_collator_names_the_records_the_processor_refuses(tmp_path, tiny_processor):
    strip = record("strip-1", str(make_image(tmp_path / "strip.png", size=(1000, 2))))  # never validated
    with pytest.raises(DataValidationError, match=r"PromptCollator: the processor refused the batch of records "
                       r"\['strip-1'\]: .*aspect ratio"):  # fmt: skip
        PromptCollator(tiny_processor)([strip])


def test_16_bit_record_reaches_the_processor_with_its_contrast(tmp_path, tiny_processor):
    gradient = np.tile(np.linspace(0, 65535, 56).astype(np.uint16), (56, 1))
    Image.fromarray(gradient).save(tmp_path / "g.png")
    batch = PromptCollator(tiny_processor)([record("g", str(tmp_path / "g.png"))])
    pixels = batch["prompt_inputs"]["pixel_values"]  # [patches, 1176]
    assert len(torch.unique(pixels)) > 100  # 168 here; the saturated image of plain convert("RGB") gives 6


def test_image_paths_must_stay_under_the_image_root(tmp_path):
    data = tmp_path / "data"
    rows = pathmmu_rows(data, 3)
    outside = make_image(tmp_path / "elsewhere" / "x.png")
    rows[1]["image"] = "../elsewhere/x.png"
    rows[2]["image"] = str(outside)
    path = write_jsonl(data / "d.jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        load_records(path)
    assert str(caught.value) == (
        f"{path}: record 'q001' (row 1): image path '../elsewhere/x.png' leads outside the image root "
        f"'{data.resolve()}'; set image_root to a folder that holds the images, or allow_absolute_image_paths: "
        "true to accept any path"
    )
    records, report = load_records(path, on_invalid="skip")
    assert [r.id for r in records] == ["q000"] and dict(report.skipped) == {"image_outside_root": 2}
    allowed = load_records(path, allow_absolute_image_paths=True).records
    assert [r.image for r in allowed[1:]] == [str(outside), str(outside)]
    rows[0]["image"] = str(data / "images" / "0000.png")  # absolute, but under the image root: fine
    assert load_records(write_jsonl(data / "d.jsonl", rows[:1])).records[0].image == rows[0]["image"]


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    """A 12000x12000 PNG header with no pixel data: refused as too large (not corrupt), so the size
    check runs before any decoding (which would cost seconds and gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB
    pixels = zlib.compress(b"\x00" * 100)  # a first sliver of one row; the other rows never come
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    (tmp_path / "huge.png").write_bytes(png)
    too_large = r"is 12000x12000 = 144,000,000 pixels, over max_image_pixels 16,777,216"
    with pytest.raises(InvalidRecord, match=too_large) as caught:
        check_image(str(tmp_path / "huge.png"))
    assert caught.value.kind == "image_too_large"


@pytest.mark.parametrize("size", [(56, 56), (300, 200), (2000, 30), (1000, 800)])
def test_image_tokens_match_the_processor(tiny_processor, size):
    grid = tiny_processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"]
    assert image_tokens(*size, tiny_processor.image_processor) == int(grid.prod()) // 4  # merge 2 x 2


def test_image_over_the_length_limit_is_refused_at_validation(tmp_path, tiny_processor):
    rows = _rows_with(tmp_path, "wide.png", (300, 300))  # 121 image tokens; the 56x56 tiles take 4
    kwargs = dict(data_path=str(write_jsonl(tmp_path / "d.jsonl", rows)), split_sizes={"sft": 1, "test": None},
                  processor=tiny_processor, on_invalid="skip")  # fmt: skip
    datamodule = VQADataModule(split_dir=str(tmp_path / "a"), max_length=400, max_prompt_length=100, **kwargs)
    datamodule.prepare_data()
    assert dict(datamodule.validation_report.skipped) == {"too_long": 1}
    assert "wide.png' (300x300) becomes 121 image tokens, over max_prompt_length 100 before any text; lower the " \
           "backbone's max_pixels (now 200,704) or raise max_prompt_length" in datamodule.validation_report.messages[0]
    unlimited = VQADataModule(split_dir=str(tmp_path / "b"), **kwargs)
    unlimited.prepare_data()
    assert unlimited.validation_report.num_skipped == 0


def test_image_module_doctests_pass():
    import doctest

    from pathvlm_lightning.data import images

    result = doctest.testmod(images)
    assert result.attempted >= 3 and result.failed == 0
