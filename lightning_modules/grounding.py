"""Grounded visual tokens: what each patch of a shapes scene holds, written in the decoder's own words.

The tiny LLaVA's decoder starts from random weights, and learning to read images and to answer at
once, through a projector that is also learning, stayed at chance for the whole CPU budget. So the
stages meet at an interface they can each learn alone: the visual token of a patch is the sum of
the input embeddings of the words that describe it (`grounded_tokens`),

    object patch:  E[colour] + E[shape]          (+ E[code] where a label lies on it)
    label patch:   E[code]                        (the code it reads, e.g. "k7x")
    centre patch:  + E["."]                       (one per object: counting is counting dots)
    background:    E[","]
    every patch:   + (1 - x) E["left"] + x E["right"] + (1 - y) E["above"] + y E["below"]

with x, y the patch's column and row scaled to [0, 1], so where a thing is stays in its token
and not only in the decoder's 1-D raster positions. The decoder learns the questions on these
tokens (`grounded_pretraining`); the projector then learns to write them from the frozen tower's
features (`projector_alignment`); and both fine-tune together on the images (`qa_finetuning`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.shapes_scene import SHAPES, TEXTS
from data.shapes_targets import COLOR_NAMES, GRID_SIDE

BACKGROUND, CENTRE = ",", "."
SIDES = ("left", "right", "above", "below")


class GroundingWords:
    """Token ids of the words of `grounded_tokens`, looked up once per tokenizer. Class ids of the
    patch targets index these tables; their class 0 ("nothing") and the label class of colour and
    shape map to the background word, and are masked out where they would be wrong."""

    def __init__(self, tokenizer) -> None:
        def ids(words: list[str]) -> Tensor:
            found = tokenizer.convert_tokens_to_ids(words)
            missing = [w for w, i in zip(words, found) if i == tokenizer.unk_token_id]
            if missing:
                raise ValueError(f"the tokenizer lacks the grounding words {missing}")
            return torch.tensor(found)

        self.background, self.centre = ids([BACKGROUND, CENTRE])
        self.color = ids([BACKGROUND, *COLOR_NAMES, BACKGROUND])  # 0: background, last: label
        self.shape = ids([BACKGROUND, *SHAPES, BACKGROUND])
        self.code = ids([BACKGROUND, *(t.lower() for t in TEXTS)])
        self.sides = ids(list(SIDES))


def grounded_tokens(targets: dict[str, Tensor], embedding: Tensor, words: GroundingWords) -> Tensor:
    """(B, 576, D) visual tokens of scenes with patch targets `targets` (`data.shapes_targets`), from the
    decoder's input embedding matrix `embedding` (V, D); differentiable in `embedding`."""
    color, shape, code = targets["patch_color"], targets["patch_shape"], targets["patch_code"]
    obj = ((color > 0) & (color <= len(COLOR_NAMES)))[..., None]
    words_of = {k: v.to(embedding.device) for k, v in vars(words).items()}
    thing = embedding[words_of["color"][color]] + embedding[words_of["shape"][shape]]
    label = (code > 0)[..., None]
    tokens = torch.where(obj, thing, torch.where(label, 0.0, embedding[words_of["background"]]))
    tokens = tokens + label * embedding[words_of["code"][code]]
    tokens = tokens + targets["patch_center"][..., None].bool() * embedding[words_of["centre"]]
    x = (targets["patch_col"].float() / (GRID_SIDE - 1))[..., None]
    y = (targets["patch_row"].float() / (GRID_SIDE - 1))[..., None]
    left, right, above, below = embedding[words_of["sides"]]
    return tokens + (1 - x) * left + x * right + (1 - y) * above + y * below


def object_patches(targets: dict[str, Tensor]) -> Tensor:
    """(B, 576) True where a patch holds an object or a label (the tokens a question can be about)."""
    return (targets["patch_color"] > 0) | (targets["patch_code"] > 0)
