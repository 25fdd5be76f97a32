"""What a shapes scene holds, as the targets of the vision tower's pre-training.

Scene targets (`HEADS`, read from the CLS token): which objects the scene holds (colour-shape
pairs), how many of each colour and each shape, where each colour and each shape is (a 4 x 4 grid
of object centres), and which code a label carries. To answer, the last layer's CLS attention has
to find the object and label tokens, so CLS attention carries meaning as in CLIP.

Patch targets (`PATCH_HEADS`, read from each patch token of the layer LLaVA feeds the LLM): what
covers the patch (colour, shape, or label), which label character, which whole code its label reads,
whether an object's centre lies in it, and its row and column. CLS-only pre-training learnt colours
but neither shapes nor characters within the CPU budget, so the tower also gets this dense signal
(see `lightning_modules.vision_pretraining`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.shapes import Sample
from data.shapes_questions import MAX_OBJECTS
from data.shapes_scene import ALPHABET, COLORS, IMAGE_SIZE, PATCH, SHAPES, TEXTS, char_boxes, draw_shape

GRID = 4  # where-heads: object centres on a GRID x GRID grid
COLOR_NAMES = list(COLORS)
MAX_COUNT = MAX_OBJECTS  # counts 0..MAX_COUNT

# name -> (number of heads, classes per head, kind); "bce" heads are multi-label, "ce" single-label.
HEADS = {
    "present": (1, len(COLOR_NAMES) * len(SHAPES), "bce"),
    "color_count": (len(COLOR_NAMES), MAX_COUNT + 1, "ce"),
    "shape_count": (len(SHAPES), MAX_COUNT + 1, "ce"),
    "color_where": (len(COLOR_NAMES), GRID * GRID, "bce"),
    "shape_where": (len(SHAPES), GRID * GRID, "bce"),
    "text": (1, len(TEXTS) + 1, "ce"),  # class 0: no label
}


GRID_SIDE = IMAGE_SIZE // PATCH  # 24 patches a side
LABEL = 255  # value of label pixels in the object map
MIN_COVER = 16  # pixels of a patch (of 196) an object or character must cover to name the patch

# name -> classes per patch token; class 0 is "nothing": background, or no character.
PATCH_HEADS = {
    "patch_color": len(COLOR_NAMES) + 2,  # + background, + label
    "patch_shape": len(SHAPES) + 2,
    "patch_char": len(ALPHABET) + 1,
    "patch_center": 2,  # an object's centre lies in the patch (one patch per object: countable)
    "patch_code": len(TEXTS) + 1,  # the whole code of the label the patch belongs to: reading is in the token
    "patch_row": GRID_SIDE,  # where the patch is: spatial relations are in the tokens, not only in the
    "patch_col": GRID_SIDE,  # LLM's 1-D raster positions
}


def scene_targets(sample: Sample) -> dict[str, torch.Tensor]:
    """Both kinds of targets, `HEADS` and `PATCH_HEADS`, for one scene."""
    return {**cls_targets(sample), **patch_targets(sample)}


def _per_patch(values: np.ndarray) -> np.ndarray:
    """(24*24, 196) pixel values of each patch, in the row-major token order of the vision tower."""
    g = values.reshape(GRID_SIDE, PATCH, GRID_SIDE, PATCH).transpose(0, 2, 1, 3)
    return g.reshape(GRID_SIDE * GRID_SIDE, PATCH * PATCH)


def _majority(values: np.ndarray) -> np.ndarray:
    """Per patch, the most frequent non-zero value covering at least MIN_COVER pixels, else 0."""
    patches = _per_patch(values).astype(np.int64)  # uint8 values: 256 bins a patch
    n = len(patches)
    counts = np.bincount((np.arange(n)[:, None] * 256 + patches).ravel(), minlength=n * 256).reshape(n, 256)
    counts[:, 0] = 0  # background never names a patch
    best = counts.argmax(1)  # ties: the smallest value
    return np.where(counts[np.arange(n), best] >= MIN_COVER, best, 0)


def patch_targets(sample: Sample) -> dict[str, torch.Tensor]:
    """Class ids per patch token (576 each) for `PATCH_HEADS`."""
    objects = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    chars = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, draw_chars = ImageDraw.Draw(objects), ImageDraw.Draw(chars)
    for i, obj in enumerate(sample.objects):
        draw_shape(draw, obj, i + 1)
    if sample.text is not None:
        x0, y0, x1, y1 = sample.text.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=LABEL)
        for char, (cx0, cy0, cx1, cy1) in char_boxes(sample.text):
            draw_chars.rectangle((cx0, cy0, cx1 - 1, cy1 - 1), fill=ALPHABET.index(char) + 1)
    owner = _majority(np.asarray(objects))
    color = np.zeros_like(owner)
    shape = np.zeros_like(owner)
    for i, obj in enumerate(sample.objects):
        color[owner == i + 1] = COLOR_NAMES.index(obj.color) + 1
        shape[owner == i + 1] = SHAPES.index(obj.shape) + 1
    color[owner == LABEL], shape[owner == LABEL] = len(COLOR_NAMES) + 1, len(SHAPES) + 1
    center = np.zeros_like(owner)
    for obj in sample.objects:
        cx, cy = obj.center
        center[int(cy // PATCH) * GRID_SIDE + int(cx // PATCH)] = 1
    char = _majority(np.asarray(chars))
    code = np.zeros_like(owner)
    if sample.text is not None:
        code[(owner == LABEL) | (char > 0)] = TEXTS.index(sample.text.text) + 1
    where = np.arange(GRID_SIDE * GRID_SIDE)
    return {
        "patch_color": torch.from_numpy(color),
        "patch_shape": torch.from_numpy(shape),
        "patch_char": torch.from_numpy(char),
        "patch_center": torch.from_numpy(center),
        "patch_code": torch.from_numpy(code),
        "patch_row": torch.from_numpy(where // GRID_SIDE),
        "patch_col": torch.from_numpy(where % GRID_SIDE),
    }


def cls_targets(sample: Sample) -> dict[str, torch.Tensor]:
    """The targets of `HEADS` for one scene: float multi-hot for "bce" heads, class ids for "ce"."""
    present = torch.zeros(len(COLOR_NAMES) * len(SHAPES))
    color_count = torch.zeros(len(COLOR_NAMES), dtype=torch.long)
    shape_count = torch.zeros(len(SHAPES), dtype=torch.long)
    color_where = torch.zeros(len(COLOR_NAMES), GRID * GRID)
    shape_where = torch.zeros(len(SHAPES), GRID * GRID)
    for obj in sample.objects:
        c, s = COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape)
        cx, cy = obj.center
        cell = int(cy * GRID // IMAGE_SIZE) * GRID + int(cx * GRID // IMAGE_SIZE)
        present[c * len(SHAPES) + s] = 1
        color_count[c] += 1
        shape_count[s] += 1
        color_where[c, cell] = 1
        shape_where[s, cell] = 1
    text = 0 if sample.text is None else TEXTS.index(sample.text.text) + 1
    return {
        "present": present[None],
        "color_count": color_count,
        "shape_count": shape_count,
        "color_where": color_where,
        "shape_where": shape_where,
        "text": torch.tensor([text]),
    }
