"""Scenes of the shapes benchmark: what a scene holds, where things go, and how it is drawn.

A scene is a list of `Obj` (colour, shape, size, position) and at most one `Text` (a short code on a
high-contrast label, on an object or in a corner), drawn on a textured, noisy background. Layout
uses a `random.Random` (so it is cheap and can run without drawing); drawing uses a numpy generator
seeded separately, so the same scene always gives byte-identical pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336  # CLIP-style patch 14 -> a 24 x 24 grid, 576 visual tokens, as LLaVA-1.5
PATCH = 14

# Saturated colours only: the background is a muted grey and text labels are black or white, so
# neither can be mistaken for an object colour.
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 80, 225),
    "purple": (145, 55, 200),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]

# Characters that stay distinct in one patch cell in Pillow's bundled font ("M" is dropped: at the
# label's font size it is wider than a cell).
ALPHABET = "ABEHKRX2347"
# The codes a label can carry (the answers of `read`): six of two characters and six of three. A fixed
# list keeps the answer set small enough to balance; reversed pairs (AK / KA) make order matter, so
# one glyph is never enough.
TEXTS = ["AK", "KA", "R7", "7R", "E3", "3E", "HXB", "BXH", "2A4", "4A2", "K7E", "E7K"]  # fmt: skip
FONT_SIZES = (16, 18)  # capital height 11-13 px: a glyph fills most of its 14 px cell
CORNERS = ["top left", "top right", "bottom left", "bottom right"]

# Everything sits on the patch grid: an object fills a block of `cells` x `cells` patches (less a
# 1 px margin all round), a label one patch per character. So every visual token holds one thing
# (or a part of one), as in a photo of large objects, and a 6-layer tower trained for minutes on a
# CPU can tell the shapes apart; objects placed at any pixel were split across up to four patches
# and a tower trained for 2.5 hours named the right shape for only half of them.
CELL = PATCH
GRID_CELLS = IMAGE_SIZE // CELL  # 24 patches a side
MARGIN = 1  # px between an object's box and the edge of its block
SIZE_CELLS = (1, 2, 3)  # plain objects: under one patch (12 px) to 3 x 3 patches (40 px) ...
SIZE_WEIGHTS = (0.35, 0.35, 0.3)
CARRIER_CELLS = 5  # ... an object that carries a label: 5 x 5 patches (68 px), the label on its middle row
GAP_CELLS = 1  # empty cells kept between any two things
SIDE_GAP = PATCH  # spatial pairs are at least one patch apart on the asked axis


@dataclasses.dataclass
class Obj:
    """One object: `x`, `y` is the top-left corner of its `size` x `size` bounding box (px)."""

    color: str
    shape: str
    size: int = 0
    x: int = 0
    y: int = 0
    carrier: bool = False  # carries a label: drawn CARRIER_CELLS patches wide

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2

    @property
    def cells(self) -> int:
        return (self.size + 2 * MARGIN) // CELL

    @property
    def block(self) -> tuple[int, int, int, int]:
        """(col0, row0, col1, row1) of the patches it fills, half-open."""
        col, row = (self.x - MARGIN) // CELL, (self.y - MARGIN) // CELL
        return col, row, col + self.cells, row + self.cells


@dataclasses.dataclass
class Text:
    """A label: `text` (uppercase), one character a patch, its top-left patch at (`col`, `row`)."""

    text: str
    where: str  # "corner" or "object"
    target: int | str  # the object's index, or a name from CORNERS
    font_size: int = FONT_SIZES[-1]
    dark_on_light: bool = True
    col: int = 0
    row: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        return tuple(CELL * edge for edge in self.block)

    @property
    def block(self) -> tuple[int, int, int, int]:
        return self.col, self.row, self.col + len(self.text), self.row + 1


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no font files needed; Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


@functools.cache
def _line_extent(size: int) -> tuple[int, int]:
    """Top and bottom of the ink of every character of ALPHABET, so all labels share a baseline."""
    boxes = [font(size).getbbox(c) for c in ALPHABET]
    return min(b[1] for b in boxes), max(b[3] for b in boxes)


def side_of(a: Obj, b: Obj) -> str | None:
    """Where `a` is relative to `b` ("left", "right", "above", "below"), or None when not clear.

    Clear means: at least SIDE_GAP px of space between the two boxes on that axis, and the offset
    on the other axis at most half the offset on that one, so no other answer is defensible.
    """
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dy) <= abs(dx) / 2:
        if a.box[2] + SIDE_GAP <= b.box[0]:
            return "left"
        if b.box[2] + SIDE_GAP <= a.box[0]:
            return "right"
    if abs(dx) <= abs(dy) / 2:
        if a.box[3] + SIDE_GAP <= b.box[1]:
            return "above"
        if b.box[3] + SIDE_GAP <= a.box[1]:
            return "below"
    return None


def _corner_cell(corner: str, length: int) -> tuple[int, int]:
    col = 0 if "left" in corner else GRID_CELLS - length
    row = 0 if "top" in corner else GRID_CELLS - 1
    return col, row


def _label_cell(obj: Obj, length: int) -> tuple[int, int]:
    """Where a label sits on its carrier: centred on the middle row (on a triangle, a row lower,
    where it is wide enough to show the colour around the label)."""
    col0, row0, _, _ = obj.block
    row = row0 + obj.cells // 2 + (1 if obj.shape == "triangle" else 0)
    return col0 + (obj.cells - length) // 2, row


def _free(taken: np.ndarray, block: tuple[int, int, int, int]) -> bool:
    c0, r0, c1, r1 = block
    g = GAP_CELLS
    return not taken[max(0, r0 - g) : r1 + g, max(0, c0 - g) : c1 + g].any()


def _take(taken: np.ndarray, block: tuple[int, int, int, int]) -> None:
    c0, r0, c1, r1 = block
    taken[r0:r1, c0:c1] = True


def _try_place(
    rng: random.Random, objects: list[Obj], text: Text | None, relation: tuple[int, int, str] | None
) -> bool:
    taken = np.zeros((GRID_CELLS, GRID_CELLS), bool)
    if text is not None and text.where == "corner":
        text.col, text.row = _corner_cell(str(text.target), len(text.text))
        _take(taken, text.block)
    for obj in objects:
        cells = CARRIER_CELLS if obj.carrier else rng.choices(SIZE_CELLS, SIZE_WEIGHTS)[0]
        obj.size = cells * CELL - 2 * MARGIN
    order = list(range(len(objects)))
    if relation is not None:  # place the reference object first, then the one related to it
        a, b, _ = relation
        order = [b, a] + [i for i in order if i not in (a, b)]
    for i in order:
        obj = objects[i]
        for _ in range(100):
            obj.x = rng.randrange(GRID_CELLS - obj.cells + 1) * CELL + MARGIN
            obj.y = rng.randrange(GRID_CELLS - obj.cells + 1) * CELL + MARGIN
            if not _free(taken, obj.block):
                continue
            if relation is not None and i == relation[0] and side_of(obj, objects[relation[1]]) != relation[2]:
                continue
            _take(taken, obj.block)
            break
        else:
            return False
    if text is not None and text.where == "object":
        text.col, text.row = _label_cell(objects[int(text.target)], len(text.text))
    return True


def layout(
    rng: random.Random,
    objects: list[Obj],
    text: Text | None = None,
    relation: tuple[int, int, str] | None = None,
) -> None:
    """Give every object a size and a place on the patch grid, in place: no two overlap or touch,
    none covers a corner label, and `relation` (a, b, side), if given, holds: objects[a] is clearly
    `side` of objects[b]."""
    if text is not None and text.where == "object":
        objects[int(text.target)].carrier = True
    for _ in range(200):  # each try draws new sizes, so a crowded draw does not stick
        if _try_place(rng, objects, text, relation):
            return
    raise RuntimeError(f"could not lay out {len(objects)} objects without overlap")


def _background(gen: np.random.Generator) -> np.ndarray:
    """A smooth two-colour gradient plus one texture (stripes, checker or blotches), float HxWx3.

    Muted greys with a slight tint, so saturated objects stand out; the texture makes background
    patches similar but never identical, which is what token-merging methods should exploit.
    """
    # float32 arrays throughout (Python floats keep them so): half the time of float64.
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    c0, c1 = (gen.uniform(70, 170) + gen.uniform(-20, 20, 3).astype(np.float32) for _ in range(2))
    angle = float(gen.uniform(0, 2 * math.pi))
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    img = c0 + (c1 - c0) * t[..., None]
    kind = gen.integers(3)
    amp = float(gen.uniform(5, 12))
    if kind == 0:  # stripes at a random angle and period
        phi, period, phase = (float(v) for v in (gen.uniform(0, math.pi), gen.uniform(8, 40), gen.uniform(0, 7)))
        tex = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * (2 * math.pi / period) + phase)
    elif kind == 1:  # checkerboard
        cell = int(gen.integers(8, 29))
        tex = (((xx + int(gen.integers(cell))) // cell + (yy + int(gen.integers(cell))) // cell) % 2) * 2.0 - 1.0
    else:  # blotches: coarse noise, smoothly upsampled
        coarse = gen.uniform(0, 255, (6, 6)).astype(np.uint8)
        tex = np.asarray(Image.fromarray(coarse).resize((n, n), Image.BICUBIC), np.float32) / 127.5 - 1.0
    return img + amp * tex[..., None]


def draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, rgb: tuple[int, int, int] | int) -> None:
    """Fill `obj`'s shape with `rgb` (an int for single-band images, as the object masks use)."""
    x0, y0 = obj.x, obj.y
    x1, y1 = x0 + obj.size - 1, y0 + obj.size - 1  # PIL boxes include their last pixel
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = (obj.size - 1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif obj.shape == "square":
        inset = obj.size * 0.06
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif obj.shape == "cross":
        half = obj.size * 0.17
        draw.rectangle((x0, cy - half, x1, cy + half), fill=rgb)
        draw.rectangle((cx - half, y0, cx + half, y1), fill=rgb)
    elif obj.shape == "star":
        # Five points; the outline spans r above the centre but only r*cos(36deg) below, so shift it
        # down to fill the box evenly.
        shift = r * (1 - math.cos(math.pi / 5)) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + shift + radius * math.sin(a)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def char_boxes(text: Text) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Each character of a label with the box (x0, y0, x1, y1, half-open) of its cell."""
    x0, y0, _, y1 = text.box
    return [(char, (x0 + k * CELL, y0, x0 + (k + 1) * CELL, y1)) for k, char in enumerate(text.text)]


def _draw_label(draw: ImageDraw.ImageDraw, text: Text) -> None:
    ink, paper = ((15, 15, 15), (250, 250, 250)) if text.dark_on_light else ((250, 250, 250), (15, 15, 15))
    x0, y0, x1, y1 = text.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=paper)
    top, bottom = _line_extent(text.font_size)
    f = font(text.font_size)
    for char, (cx0, cy0, _, _) in char_boxes(text):
        left, _, right, _ = f.getbbox(char)
        # getbbox is relative to the drawing origin: shift so the ink is centred in its cell and
        # every glyph of the label shares the line of ALPHABET.
        x = cx0 + (CELL - (right - left)) / 2 - left
        y = cy0 + (CELL - (bottom - top)) / 2 - top
        draw.text((round(x), round(y)), char, font=f, fill=ink)


def render(objects: list[Obj], text: Text | None, seed: int, noise: float = 4.0) -> Image.Image:
    """Draw a laid-out scene: background, objects (colour jittered a little), label, pixel noise."""
    gen = np.random.default_rng(seed)
    image = Image.fromarray(np.clip(_background(gen), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + gen.integers(-12, 13, 3), 0, 255))
        draw_shape(draw, obj, rgb)
    if text is not None:
        _draw_label(draw, text)
    # Per-pixel noise is incompressible: it makes a PNG about 190 kB (35 kB without), the price of
    # background tokens that are never exact copies of each other.
    pixels = np.asarray(image, np.float32) + noise * gen.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
