"""Drawing of the built-in synthetic images: pathology-like tiles and three out-of-domain modalities.

Every picture is drawn from a small frozen spec plus a numpy ``Generator``, so each question's answer
is a field of the spec and the drawing only has to make that field visible. Features are drawn with
high contrast and mild noise because the embedded model's vision tower is tiny (a 112x112 image is
16 image tokens): a feature it cannot see would leave SFT at chance and give GRPO only noise to learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

TILE_SIZE = 112  # pixels; 112 / 14 = 8 patches a side, merged 2x2 -> 16 image tokens

STAIN_CLASSES = ("H&E", "IHC, DAB-negative", "IHC, partly DAB-positive", "IHC, mostly DAB-positive")
SIZE_GRADES = ("small", "medium", "large", "very large")
DENSITY_GRADES = ("sparse", "moderate", "dense", "very dense")
ARRANGEMENTS = ("scattered", "clustered", "gland", "sheet")

NUCLEUS_RADII = (2.5, 3.5, 4.9, 6.8)  # mean radius (px) per size grade: each grade ~doubles the area
NUCLEUS_COUNTS = ((4, 6), (9, 12), (16, 21), (27, 33))  # inclusive nucleus count range per density grade
DAB_FRACTIONS = {"IHC, partly DAB-positive": (0.2, 0.4), "IHC, mostly DAB-positive": (0.75, 1.0)}

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Palette:
    background: RGB  # stroma / empty slide
    texture: RGB  # second shade mixed in by the low-frequency texture (cytoplasm, fibres)
    nucleus: RGB  # hematoxylin
    lumen: RGB  # gland lumen


_HE = _Palette(background=(242, 196, 218), texture=(224, 146, 188), nucleus=(88, 42, 128), lumen=(250, 240, 246))
_IHC = _Palette(background=(238, 238, 244), texture=(204, 211, 234), nucleus=(72, 92, 168), lumen=(250, 250, 252))
_DAB: RGB = (138, 82, 36)


@dataclass(frozen=True)
class TileSpec:
    """What a pathology-like tile shows; every question about the tile is answered from these fields."""

    stain: str  # one of STAIN_CLASSES
    size_grade: int  # index into SIZE_GRADES
    density_grade: int  # index into DENSITY_GRADES
    arrangement: str  # one of ARRANGEMENTS; a nuisance feature no question asks about

    def __post_init__(self) -> None:
        if self.stain not in STAIN_CLASSES:
            raise ValueError(f"TileSpec: unknown stain {self.stain!r}; expected one of {STAIN_CLASSES}")
        if self.arrangement not in ARRANGEMENTS:
            raise ValueError(f"TileSpec: unknown arrangement {self.arrangement!r}; expected one of {ARRANGEMENTS}")
        for name, grade in (("size_grade", self.size_grade), ("density_grade", self.density_grade)):
            if grade not in range(4):
                raise ValueError(f"TileSpec: {name} must be 0-3, got {grade!r}")

    @property
    def modality(self) -> str:
        return "H&E" if self.stain == "H&E" else "IHC"

    @classmethod
    def sample(cls, rng: np.random.Generator) -> TileSpec:
        """Every feature uniform and independent, so every question type has balanced classes."""
        return cls(
            stain=STAIN_CLASSES[rng.integers(4)],
            size_grade=int(rng.integers(4)),
            density_grade=int(rng.integers(4)),
            arrangement=ARRANGEMENTS[rng.integers(4)],
        )


def generate_tile(spec: TileSpec, rng: np.random.Generator) -> Image.Image:
    """Draw a 112x112 RGB tissue-like tile showing ``spec``.

    H&E: pink eosin background, purple hematoxylin nuclei. IHC: pale blue counterstain, nuclei blue or
    brown (DAB) according to the stain class. Nuclei are soft-edged ellipses whose size and count follow
    the grades; the arrangement only moves them around.
    """
    palette = _HE if spec.stain == "H&E" else _IHC
    canvas = _textured_canvas(palette.background, palette.texture, rng)  # [H, W, 3] float
    radius = NUCLEUS_RADII[spec.size_grade] * rng.uniform(0.92, 1.08)
    low, high = NUCLEUS_COUNTS[spec.density_grade]
    count = int(rng.integers(low, high + 1))
    centres, lumens = _arrange(spec.arrangement, count, radius, rng)
    for cy, cx, lumen_radius in lumens:
        _paint_ellipse(canvas, cy, cx, lumen_radius, lumen_radius, 0.0, palette.lumen)
    colours = _nucleus_colours(spec.stain, count, palette, rng)  # [count, 3]
    for (cy, cx), colour in zip(centres, colours):
        r = radius * rng.uniform(0.9, 1.1)
        elongation = rng.uniform(1.0, 1.3)
        _paint_ellipse(canvas, cy, cx, r * elongation, r / elongation, rng.uniform(0, math.pi), colour)
    return _to_image(canvas, rng, noise=4.0)


def _nucleus_colours(stain: str, count: int, palette: _Palette, rng: np.random.Generator) -> np.ndarray:
    """One colour per nucleus: hematoxylin, with a DAB-brown share set by the IHC stain class."""
    brown = 0
    if stain in DAB_FRACTIONS:
        low, high = DAB_FRACTIONS[stain]
        brown = int(np.clip(round(count * rng.uniform(low, high)), 1, count))
        if stain == "IHC, partly DAB-positive":
            brown = min(brown, count - 1)  # at least one blue nucleus, or it would not be "partly"
    colours = np.array([_DAB] * brown + [palette.nucleus] * (count - brown), dtype=np.float64)
    colours += rng.normal(0.0, 6.0, size=colours.shape)  # stain intensity varies between nuclei
    return colours[rng.permutation(count)]


def _arrange(
    arrangement: str, count: int, radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Nucleus centres ``[count, 2]`` (y, x) and gland lumens ``[(y, x, radius)]`` for an arrangement.

    Each arrangement is a proposal distribution for nucleus ``i``; ``_place`` then keeps nuclei apart.
    """
    lo, hi = radius + 1.0, TILE_SIZE - radius - 1.0
    lumens: list[tuple[float, float, float]] = []
    if arrangement == "sheet":  # a jittered grid filling the whole tile
        side = math.ceil(math.sqrt(count))
        step = (hi - lo) / max(side - 1, 1)
        cells = np.array([(lo + step * (j // side), lo + step * (j % side)) for j in range(side * side)])
        cells = cells[rng.permutation(side * side)[:count]]  # [count, 2]

        def propose(i: int, k: int) -> np.ndarray:
            return cells[i] + rng.normal(0.0, 0.15 * step, size=(k, 2))

    elif arrangement == "clustered":  # one or two tight groups
        clusters = 1 if count <= 12 else 2
        centres = rng.uniform(36, 76, size=(clusters, 2))
        spread = radius * math.sqrt(count / clusters) + 4.0

        def propose(i: int, k: int) -> np.ndarray:
            return centres[i % clusters] + rng.normal(0.0, spread, size=(k, 2))

    elif arrangement == "gland":  # nuclei line the rim of one or two lumens; the overflow lies in the stroma
        glands = 1 if count <= 12 else 2
        ring = min(24.0 if glands == 2 else 38.0, max(10.0, count / glands * 2.3 * radius / (2 * math.pi)))
        capacity = max(1, int(2 * math.pi * ring / (2.2 * radius)))
        tilt = rng.uniform(0, math.pi)
        sides = (0.0,) if glands == 1 else (-28.0, 28.0)
        rims = [(56 + d * math.sin(tilt) + rng.normal(0, 3), 56 + d * math.cos(tilt) + rng.normal(0, 3)) for d in sides]
        lumens = [(y, x, ring - 1.6 * radius) for y, x in rims if ring - 1.6 * radius > 2.0]

        def propose(i: int, k: int) -> np.ndarray:
            gland, slot = i % glands, i // glands
            if slot >= capacity:
                return rng.uniform(lo, hi, size=(k, 2))
            angle = 2 * math.pi * slot / capacity + rng.normal(0.0, 0.1, size=k)
            dist = ring + rng.normal(0.0, 0.3 * radius, size=k)
            cy, cx = rims[gland]
            return np.stack([cy + dist * np.sin(angle), cx + dist * np.cos(angle)], axis=1)

    else:  # scattered: uniform over the tile

        def propose(i: int, k: int) -> np.ndarray:
            return rng.uniform(lo, hi, size=(k, 2))

    return _place(count, radius, lo, hi, propose), lumens


def _place(
    count: int, radius: float, lo: float, hi: float, propose: Callable[[int, int], np.ndarray]
) -> np.ndarray:
    """Take for each nucleus the first of 24 proposals that does not touch an earlier one (else the
    farthest), so nuclei stay countable wherever the arrangement leaves room."""
    centres = np.empty((count, 2))  # [count, 2] (y, x)
    for i in range(count):
        candidates = np.clip(propose(i, 24), lo, hi)  # [24, 2]
        if i == 0:
            centres[i] = candidates[0]
            continue
        gaps = np.linalg.norm(candidates[:, None, :] - centres[None, :i, :], axis=-1).min(axis=1)  # [24]
        free = np.flatnonzero(gaps >= 2.2 * radius)
        centres[i] = candidates[free[0]] if free.size else candidates[np.argmax(gaps)]
    return centres


def _textured_canvas(base: RGB, texture: RGB, rng: np.random.Generator, cells: int = 8) -> np.ndarray:
    """``[H, W, 3]`` float canvas mixing two shades by smooth low-frequency noise (tissue texture)."""
    coarse = Image.fromarray(rng.uniform(0.0, 0.7, size=(cells, cells)).astype(np.float32), mode="F")
    mix = np.asarray(coarse.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC))[..., None]  # [H, W, 1]
    base_rgb = np.asarray(base, dtype=np.float32)
    return base_rgb + (np.asarray(texture, dtype=np.float32) - base_rgb) * np.clip(mix, 0.0, 1.0)


_YY, _XX = np.mgrid[0:TILE_SIZE, 0:TILE_SIZE].astype(np.float32)  # [H, W] pixel-centre coordinates


def _paint_ellipse(canvas: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float, colour) -> None:
    """Blend a filled ellipse (semi-axes a, b, rotated by ``angle``) with a one-pixel soft edge."""
    reach = int(math.ceil(max(a, b))) + 2
    y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, TILE_SIZE)
    x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, TILE_SIZE)
    dy, dx = _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx  # [h, w]
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / a
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / b
    coverage = (1.0 - np.sqrt(u * u + v * v)) * min(a, b) + 0.5  # > 1 inside, < 0 outside, ramp at the edge
    alpha = np.minimum(np.maximum(coverage, 0.0), 1.0)[..., None]  # [h, w, 1]
    region = canvas[y0:y1, x0:x1]
    region += (np.asarray(colour, dtype=np.float32) - region) * alpha


def _to_image(canvas: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    noisy = canvas + noise * rng.standard_normal(size=canvas.shape, dtype=np.float32)  # [H, W, 3]
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), mode="RGB")


# --- out-of-domain modalities: each mirrors one in-domain skill (size, colour, count) -----------------

CT_LESION_GRADES = SIZE_GRADES
CT_LESION_RADII = (2.5, 4.5, 7.0, 10.5)  # px, per grade
DERM_COLOURS: dict[str, RGB] = {
    "light brown": (196, 138, 96),
    "dark brown": (112, 66, 40),
    "black": (42, 34, 36),
    "red": (196, 58, 66),
}
FUNDUS_SPOT_GRADES = ("none", "a few", "several", "many")
FUNDUS_SPOT_COUNTS = ((0, 0), (2, 4), (6, 9), (14, 20))


def draw_ct(lesion_grade: int, rng: np.random.Generator) -> Image.Image:
    """A grey axial chest-CT-like slice: body ellipse, two dark lungs, one bright nodule in a lung."""
    canvas = np.zeros((TILE_SIZE, TILE_SIZE, 3), dtype=np.float32)
    _paint_ellipse(canvas, 56, 56, 52, 44, math.pi / 2, (112, 112, 112))
    lungs = ((56.0, 34.0), (56.0, 78.0))
    for cy, cx in lungs:
        _paint_ellipse(canvas, cy, cx, 32, 17, math.pi / 2, (34, 34, 34))
    cy, cx = lungs[rng.integers(2)]
    r = CT_LESION_RADII[lesion_grade] * rng.uniform(0.92, 1.08)
    room_y, room_x = max(30.0 - r, 0.0), max(15.0 - r, 0.0)
    ly, lx = cy + rng.uniform(-room_y, room_y), cx + rng.uniform(-room_x, room_x)
    _paint_ellipse(canvas, ly, lx, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, math.pi), (222, 222, 222))
    return _to_image(canvas, rng, noise=6.0)


def draw_dermoscopy(colour: str, rng: np.random.Generator) -> Image.Image:
    """Skin-coloured field with one irregular pigmented lesion of the given colour."""
    canvas = _textured_canvas((232, 190, 164), (214, 164, 138), rng)
    image = _to_image(canvas, rng, noise=3.0)
    base = rng.uniform(20, 32)
    phases = rng.uniform(0, 2 * math.pi, size=3)
    cy, cx = rng.uniform(48, 64, size=2)
    outline = []
    for t in np.linspace(0, 2 * math.pi, 48, endpoint=False):
        wobble = 1 + 0.12 * math.sin(3 * t + phases[0]) + 0.08 * math.sin(5 * t + phases[1])
        r = base * wobble * (1 + 0.05 * math.sin(7 * t + phases[2]))
        outline.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    shade = tuple(int(c) for c in np.clip(np.array(DERM_COLOURS[colour]) + rng.normal(0, 6, 3), 0, 255))
    ImageDraw.Draw(image).polygon(outline, fill=shade)
    return image


def draw_fundus(spot_grade: int, rng: np.random.Generator) -> Image.Image:
    """An orange retina disc with an optic disc, dark vessels, and a graded number of bright exudates."""
    canvas = np.zeros((TILE_SIZE, TILE_SIZE, 3), dtype=np.float32)
    _paint_ellipse(canvas, 56, 56, 53, 53, 0.0, (206, 96, 44))
    side = 1 if rng.random() < 0.5 else -1
    oy, ox = 56 + rng.normal(0, 3), 56 + side * 26
    _paint_ellipse(canvas, oy, ox, 8, 7, math.pi / 2, (244, 212, 128))
    image = _to_image(canvas, rng, noise=4.0)
    draw = ImageDraw.Draw(image)
    for angle in rng.uniform(0, 2 * math.pi, size=int(rng.integers(4, 7))):
        points = [(ox, oy)]
        for _ in range(6):  # a gently curving vessel: the heading drifts a little at each segment
            angle += 0.25 * rng.normal()
            points.append((points[-1][0] + 10 * math.cos(angle), points[-1][1] + 10 * math.sin(angle)))
        draw.line(points, fill=(128, 30, 24), width=2)
    low, high = FUNDUS_SPOT_COUNTS[spot_grade]
    spots = _spread_points(int(rng.integers(low, high + 1)), rng, avoid=(oy, ox))
    for sy, sx in spots:
        r = rng.uniform(2.0, 3.0)
        draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(252, 238, 150))
    pixels = np.asarray(image).copy()  # [H, W, 3]
    pixels[(_YY - 56) ** 2 + (_XX - 56) ** 2 > 53**2] = 0  # vessels stop at the rim of the retina
    return Image.fromarray(pixels, mode="RGB")


def _spread_points(count: int, rng: np.random.Generator, avoid: tuple[float, float]) -> list[tuple[float, float]]:
    """``count`` points inside the retina, apart from each other and off the optic disc (countable)."""
    points: list[tuple[float, float]] = []
    while len(points) < count:
        y, x = rng.uniform(14, 98, size=2)
        inside = (y - 56) ** 2 + (x - 56) ** 2 < 44**2
        clear = (y - avoid[0]) ** 2 + (x - avoid[1]) ** 2 > 14**2 and all(
            (y - py) ** 2 + (x - px) ** 2 > 8**2 for py, px in points
        )
        if inside and clear:
            points.append((float(y), float(x)))
    return points
