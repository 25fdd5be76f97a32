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

# Characters that stay distinct at one patch of height in Pillow's bundled font.
ALPHABET = "ABEHKMRX2347"
# The codes a label can carry (the answers of `read`). A fixed list keeps the answer set small
# enough to balance; reversed pairs (AK / KA) make order matter, so one glyph is never enough.
TEXTS = [
    "AK", "KA", "R7", "7R", "E3", "3E", "HX", "XH", "M4", "4M", "BA", "2K",
    "AKR", "R7E", "E3H", "HXM", "M4B", "B2A", "K7X", "X3M", "4EA", "2HR", "7BK", "3MX",
]  # fmt: skip
FONT_SIZES = (18, 20, 22)  # capital height 13-15 px: about one patch; the label is ~1.5 patches
CORNERS = ["top left", "top right", "bottom left", "bottom right"]

MIN_SIZE, MAX_SIZE = 12, 72  # object bounding box side in px: under one patch to five patches
GAP = 6  # px of background kept between any two things
SIDE_GAP = PATCH  # spatial pairs are at least one patch apart on the asked axis
EDGE = 4  # px kept free at the image border
LABEL_PAD, CHAR_GAP = 3, 2  # label padding around the glyphs, space between glyphs


@dataclasses.dataclass
class Obj:
    """One object: `x`, `y` is the top-left corner of its `size` x `size` bounding box."""

    color: str
    shape: str
    size: int = 0
    x: int = 0
    y: int = 0
    min_size: int = 0  # raised for objects that carry a label

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2


@dataclasses.dataclass
class Text:
    """A label: `text` (uppercase) drawn at `x`, `y` (top-left of the label box)."""

    text: str
    where: str  # "corner" or "object"
    target: int | str  # the object's index, or a name from CORNERS
    font_size: int = FONT_SIZES[1]
    dark_on_light: bool = True
    x: int = 0
    y: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        w, h = label_size(self.text, self.font_size)
        return self.x, self.y, self.x + w, self.y + h


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no font files needed; Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


@functools.cache
def _line_extent(size: int) -> tuple[int, int]:
    """Top and bottom of the ink of every character of ALPHABET, so all labels share a baseline."""
    boxes = [font(size).getbbox(c) for c in ALPHABET]
    return min(b[1] for b in boxes), max(b[3] for b in boxes)


def glyph_width(char: str, size: int) -> int:
    left, _, right, _ = font(size).getbbox(char)
    return right - left


def label_size(text: str, size: int) -> tuple[int, int]:
    """Width and height of the label box for `text` at font `size`."""
    top, bottom = _line_extent(size)
    width = sum(glyph_width(c, size) for c in text) + CHAR_GAP * (len(text) - 1)
    return width + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD


def _label_anchor(obj: Obj) -> tuple[float, float]:
    """Where a label sits on an object: its centre, or lower on a triangle (where it is widest)."""
    cx, cy = obj.center
    return (cx, obj.y + 0.65 * obj.size) if obj.shape == "triangle" else (cx, cy)


def carrier_min_size(shape: str, text: Text) -> int:
    """Smallest object that a label fits on with the object's colour still showing around it."""
    w, h = label_size(text.text, text.font_size)
    factor = 1.9 if shape == "triangle" else 1.4
    return math.ceil(max(factor * w, 2.5 * h))


def _overlap(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


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


def _corner_xy(corner: str, w: int, h: int) -> tuple[int, int]:
    margin = 2 * EDGE
    x = margin if "left" in corner else IMAGE_SIZE - margin - w
    y = margin if "top" in corner else IMAGE_SIZE - margin - h
    return x, y


def _try_place(
    rng: random.Random, objects: list[Obj], text: Text | None, relation: tuple[int, int, str] | None
) -> bool:
    taken: list[tuple[int, int, int, int]] = []
    if text is not None and text.where == "corner":
        text.x, text.y = _corner_xy(str(text.target), *label_size(text.text, text.font_size))
        taken.append(text.box)
    for obj in objects:
        if obj.min_size:
            obj.size = rng.randint(obj.min_size, obj.min_size + 16)
        else:  # log-uniform, so small objects (under a patch) are as common as large ones
            obj.size = round(math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))
    order = list(range(len(objects)))
    if relation is not None:  # place the reference object first, then the one related to it
        a, b, _ = relation
        order = [b, a] + [i for i in order if i not in (a, b)]
    for i in order:
        obj = objects[i]
        for _ in range(100):
            obj.x = rng.randint(EDGE, IMAGE_SIZE - EDGE - obj.size)
            obj.y = rng.randint(EDGE, IMAGE_SIZE - EDGE - obj.size)
            if any(_overlap(obj.box, box, GAP) for box in taken):
                continue
            if relation is not None and i == relation[0] and side_of(obj, objects[relation[1]]) != relation[2]:
                continue
            taken.append(obj.box)
            break
        else:
            return False
    if text is not None and text.where == "object":
        w, h = label_size(text.text, text.font_size)
        cx, cy = _label_anchor(objects[int(text.target)])
        text.x, text.y = round(cx - w / 2), round(cy - h / 2)
    return True


def layout(
    rng: random.Random,
    objects: list[Obj],
    text: Text | None = None,
    relation: tuple[int, int, str] | None = None,
) -> None:
    """Give every object a size and a position, in place: no two overlap, none covers a corner
    label, and `relation` (a, b, side), if given, holds: objects[a] is clearly `side` of objects[b]."""
    if text is not None and text.where == "object":
        carrier = objects[int(text.target)]
        carrier.min_size = carrier_min_size(carrier.shape, text)
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
    """Each character of a label with the box (x0, y0, x1, y1, half-open) of its column in the label."""
    x0, y0, _, y1 = text.box
    x, out = x0 + LABEL_PAD, []
    for char in text.text:
        width = glyph_width(char, text.font_size)
        out.append((char, (x, y0 + LABEL_PAD, x + width, y1 - LABEL_PAD)))
        x += width + CHAR_GAP
    return out


def _draw_label(draw: ImageDraw.ImageDraw, text: Text) -> None:
    ink, paper = ((15, 15, 15), (250, 250, 250)) if text.dark_on_light else ((250, 250, 250), (15, 15, 15))
    x0, y0, x1, y1 = text.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=paper)
    top, _ = _line_extent(text.font_size)
    x = x0 + LABEL_PAD
    for char in text.text:
        left = font(text.font_size).getbbox(char)[0]
        # getbbox is relative to the drawing origin: shift so the ink starts at x and the line top
        # of ALPHABET at the padding.
        draw.text((x - left, y0 + LABEL_PAD - top), char, font=font(text.font_size), fill=ink)
        x += glyph_width(char, text.font_size) + CHAR_GAP


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
