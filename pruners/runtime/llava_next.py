"""Runtime for LLaVA-NeXT (`LlavaNextForConditionalGeneration`: any-resolution crops, CLIP tower, LLaMA decoder).

LLaVA-NeXT encodes each image as several views of one CLIP tile size: the base image (the whole image
resized, side x side patches, 576 for CLIP-L/336) and the high-resolution crops of the grid pinpoint
that fits the image best (up to 2 x 2 crops of 576 for LLaVA-NeXT-7B). HF's `pack_image_features`
then joins the crops into one grid, "unpads" it (drops the rows or columns that only cover the
letterbox padding of an image whose aspect ratio differs from the pinpoint's) and ends every row of
that grid with the learned `image_newline` token. The text holds one image token per resulting token:
base + unpadded grid + one newline per grid row (2,928 = 576 + 48 x 48 + 48 for a square image on the
2 x 2 pinpoint; the papers' 2,880 visual tokens leave the 48 newlines out).

This runtime reuses `LlavaRuntime` (the decoder loop, decode, report) and changes only the vision side:

  * Views are visible to pruners as such. At VISION_LAYER and VISION_OUTPUT each view (base or crop) is
    its own row with its own `grid` (side x side); `TokenState.view` (0 = base, 1.. = crops in row-major
    order of the crop grid) and `TokenState.image` say which image a row belongs to and which is the base.
  * Patches that unpadding will drop are in every CLIP layer, as in HF, but flagged not visual (like CLS):
    no pruner keeps, merges or counts them; they are left out after VISION_OUTPUT, as HF leaves them out.
  * Image-newline tokens are kept, always, at the end of each row of the unpadded grid, and are not visual
    tokens: no pruner drops them and no count includes them (G-Prune's official LLaVA-NeXT code keeps every
    row-end token out of its graphs and in the sequence; METHODS.md §2.2). A pruned grid row keeps its newline.
  * Placement. Every visual token goes to the image slot of the patch it stands for (its `origin`: its own
    patch, or the patch whose slot a merged token took), so the LLM sees HF's layout (base in raster order,
    then the grid row by row) with the pruned tokens left out. Position ids are the original ones, or
    contiguous for pruners that renumber. Methods' `order="official"` (VisionZip, MustDrop, PruMerge) set
    `positions` to a sequence rank meant for LLaVA-1.5's single grid; here placement ignores `positions`,
    so those methods run in raster order (their official LLaVA-NeXT codes differ again: VisionZip does not
    unpad and drops the newlines, MustDrop uses the flat merge; we keep HF's layout for every method).

Budget. `budget` counts the visual tokens of the whole image (base + crops, newlines excluded), as on
LLaVA-1.5 at the LLM's last layer; `ModelInfo.visual_tokens` is the most an image can have (base + the
largest pinpoint's crops: 2,880 for LLaVA-NeXT-7B), so budgets 1..2,880 are accepted. Vision-stage pruners
get each view's share in `TokenState.quota` (`view_quotas`): the budget is split over the image's views in
proportion to their visual tokens after unpadding, by largest remainder, ties to the earlier view (the base
first); an image with fewer visual tokens than the budget keeps them all. 640 on a square image (5 views of
576) gives 128 per view, VisionZip's LLaVA-NeXT setting. LLM-stage pruners keep budget x images visual tokens
per sample, chosen over all views jointly, as on LLaVA-1.5.

What this family provides (`provides`, pruners.base.SIGNALS): everything LLaVA-1.5 does except "grid" (a view
of an unpadded image is not a full grid of visual tokens), "single_view" (per-row schedules fixed at setup
would count views, not images) and "question" (the prompt's text at VISION_OUTPUT). Only the 'default' feature
strategy (CLS dropped) is supported, as HF's own LLaVA-NeXT packing requires.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModelOutputWithPast,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..base import ALL_SIGNALS, ModelInfo, TokenState
from ..ops import compact_index
from ..report import SampleRecord
from .decoder import Sequence
from .llava import LlavaRuntime
from .llava import model_info as llava_model_info


def model_info(model) -> ModelInfo:
    """LLaVA-1.5's description of the tower and decoder, with the whole image's views counted."""
    cfg = model.config
    vcfg = cfg.vision_config
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: LLaVA-NeXT "
            "packs crops without CLS; allowed 'default'"
        )
    base = llava_model_info(model)
    crops = max((h // vcfg.image_size) * (w // vcfg.image_size) for h, w in cfg.image_grid_pinpoints)
    return dataclasses.replace(base, family="llava-next", visual_tokens=base.visual_tokens * (1 + crops),
                               provides=LlavaNextRuntime.provides)  # fmt: skip


@dataclass
class ImageLayout:
    """Where one image's views go in its span of image tokens (offsets from the span's first token)."""

    table: Tensor  # (views, side * side) long: offset of each view's patch; -1 where unpadding drops it
    newlines: Tensor  # (grid rows,) long: offsets of the row-end newline tokens
    length: int  # image tokens in the text: base + unpadded grid + newlines


def image_layout(image_size, pinpoints: list, tile: int, side: int) -> ImageLayout:
    """HF's packing of one image (`pack_image_features`), as offsets: base patches first, then the unpadded
    crop grid row by row, each row followed by a newline. Unpadding is HF's own `unpad_image`, applied to a
    grid of patch indices."""
    rows, cols = get_anyres_image_grid_shape(image_size, pinpoints, tile)  # crops
    if image_size_to_num_patches(image_size, pinpoints, tile) != 1 + rows * cols:
        raise ValueError(f"image_grid_pinpoints {pinpoints} are not multiples of the tile size {tile}")
    width = cols * side
    kept = unpad_image(torch.arange(rows * side * width).view(1, rows * side, width), image_size)[0]
    height, kept_width = kept.shape
    flat = torch.arange(height * kept_width)
    offset = torch.full((rows * side * width,), -1, dtype=torch.long)
    offset[kept.flatten()] = side * side + flat // kept_width * (kept_width + 1) + flat % kept_width
    crop_row, crop_col = _row_col(rows * cols, cols)
    patch_row, patch_col = _row_col(side * side, side)
    spot = (crop_row[:, None] * side + patch_row) * width + crop_col[:, None] * side + patch_col  # (crops, patches)
    table = torch.cat([torch.arange(side * side)[None], offset[spot]])
    newlines = side * side + torch.arange(height) * (kept_width + 1) + kept_width
    return ImageLayout(table, newlines, side * side + height * (kept_width + 1))


def _row_col(count: int, cols: int) -> tuple[Tensor, Tensor]:
    """Row and column of each of `count` cells in raster order on a grid `cols` wide."""
    index = torch.arange(count)
    return index.div(cols, rounding_mode="floor"), index % cols


def view_quotas(budget: int, counts: Tensor) -> Tensor:
    """Each view's share (views,) of an image's `budget`: proportional to its visual tokens `counts`, rounded
    by largest remainder (ties to the earlier view, the base first); all of them if the budget covers them."""
    total = int(counts.sum())
    if budget >= total:
        return counts.clone()
    exact = budget * counts
    share = exact // total
    left = budget - int(share.sum())
    order = (exact % total).sort(descending=True, stable=True).indices
    share[order[:left]] += 1
    return share


class LlavaNextRuntime(LlavaRuntime):
    # Not "grid" (unpadded views are not full grids), not "single_view" (rows are views), not "question" (the
    # prompt's text is not handed to the views' VISION_OUTPUT hook): pruners.base.SIGNALS.
    provides = ALL_SIGNALS - {"grid", "single_view", "question"}

    def __init__(self, model, pruner) -> None:
        super().__init__(model, pruner)
        cfg = model.config
        self.pinpoints, self.tile = cfg.image_grid_pinpoints, cfg.vision_config.image_size
        self._image_sizes = None

    @staticmethod
    def _model_info(model) -> ModelInfo:
        return model_info(model)

    def forward(self, *args, image_sizes=None, **kwargs) -> LlavaNextModelOutputWithPast:
        self._image_sizes = image_sizes  # read by the prefill's `_sequence`; decoding steps carry none
        out = super().forward(*args, **kwargs)
        return LlavaNextModelOutputWithPast(
            last_hidden_state=out.last_hidden_state, past_key_values=out.past_key_values
        )

    def _sequence(self, embeds, valid, positions, image_mask, pixel_values):
        """The decoder's input: text, the kept visual tokens of every view in their image slots, the newlines."""
        n_img_tokens = int(image_mask.sum())
        if pixel_values is None or n_img_tokens == 0:
            return super()._sequence(embeds, valid, positions, image_mask, None if n_img_tokens == 0 else pixel_values)
        if self._image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
        side = self.info.grid[0]
        layouts = [image_layout(size, self.pinpoints, self.tile, side) for size in self._image_sizes]
        if n_img_tokens != sum(layout.length for layout in layouts):
            raise ValueError(
                f"input_ids hold {n_img_tokens} image tokens; the {len(layouts)} image(s) of these "
                f"image_sizes need {[layout.length for layout in layouts]}"
            )
        device = embeds.device
        table = torch.cat([layout.table for layout in layouts]).to(device)  # (views, patches)
        views = torch.tensor([len(layout.table) for layout in layouts], device=device)
        image = torch.repeat_interleave(torch.arange(len(layouts), device=device), views)
        starts = torch.tensor([0] + [layout.length for layout in layouts[:-1]], device=device).cumsum(0)
        state, vision_counts, proj_tokens = self._encode_views(pixel_values, layouts, table, image, views)

        slots = image_mask.flatten().nonzero()[:, 0]  # every image token's flat slot (b * L + l), images in order
        sample = slots[starts] // image_mask.shape[1]  # (images,)
        kept = state.valid & state.visual
        if bool((kept & (state.origin == 0)).any()):
            raise ValueError(
                f"{self.pruner.name}: a CLS token was kept as a visual token; LLaVA-NeXT has no image "
                "slot for it (allowed: pruners that keep only patch tokens, e.g. keep_cls=False)"
            )
        offset = table.gather(1, (state.origin - 1).clamp(min=0))
        if bool((offset[kept] < 0).any()):
            raise RuntimeError(f"{self.pruner.name}: a kept token stands for a patch that unpadding removes")
        target = slots[(starts[image][:, None] + offset)[kept]]
        newline = slots[torch.cat([start + layout.newlines.to(device) for start, layout in zip(starts, layouts)])]
        values = torch.cat([state.hidden[kept], self.core.image_newline.expand(len(newline), -1).to(embeds.dtype)])
        visual_mask = image_mask.flatten().index_fill(0, newline, False).view_as(image_mask)
        protected = (
            None
            if state.protected is None
            else torch.cat([state.protected[kept], torch.zeros_like(newline, dtype=torch.bool)])
        )
        num_images = torch.bincount(sample, minlength=embeds.shape[0])
        seq: Sequence = self._merge(
            embeds,
            valid,
            positions,
            image_mask,
            visual_mask,
            torch.cat([target, newline]),
            values,
            num_images,
            protected,
        )
        per_view = sample[image]
        bsz = embeds.shape[0]
        # Each view attends within itself: the encoder's attention cost is the sum of n^2 over views.
        self._pairs = [self._per_sample(c[0] ** 2, per_view, bsz) for c in vision_counts]
        return (
            seq,
            [self._per_sample(c, per_view, bsz) for c in vision_counts],
            self._per_sample(proj_tokens, per_view, bsz),
        )

    def _records(self, vision_counts, proj_tokens, counts, image_mask) -> list[SampleRecord]:
        records = super()._records(vision_counts, proj_tokens, counts, image_mask)
        if vision_counts:
            pairs = torch.stack(self._pairs).T.tolist()  # (B, layers)
            for rec, sample_pairs in zip(records, pairs):
                rec.vision_attention_pairs = sample_pairs
        return records

    def _encode_views(self, pixel_values, layouts, table, image, views) -> tuple[TokenState, list[Tensor], Tensor]:
        """Vision loop over every view of every image, projector and VISION_OUTPUT. Also returns the tokens the
        projector ran on, per view (every patch, the ones unpadding drops included, as in HF)."""
        if pixel_values.dim() == 5:  # (images, most views, 3, H, W), padded: each image's own views
            pixel_values = torch.cat([pix[: len(layout.table)] for pix, layout in zip(pixel_values, layouts)])
        if pixel_values.shape[0] != len(table):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} views; image_sizes give {len(table)}")
        # Slot 0 is CLS, slot 1 + p patch p: a patch that unpadding drops is not visual.
        visual = torch.cat([torch.zeros_like(table[:, :1], dtype=torch.bool), table >= 0], 1)
        view = torch.cat([torch.arange(int(n), device=table.device) for n in views])
        quota = None
        if self.pruner.budget is not None:
            counts = visual.sum(-1).split(views.tolist())
            quota = torch.cat([view_quotas(self.pruner.budget, c) for c in counts])
        features, counts = self.vision.run(
            pixel_values.to(self.core.vision_tower.dtype), visual=visual, view=view, image=image, quota=quota
        )
        patches = features.keep(compact_index(features.valid & (features.origin > 0)))  # CLS out ('default')
        return self._vision_output(features, patches), counts, patches.valid.sum(-1)
