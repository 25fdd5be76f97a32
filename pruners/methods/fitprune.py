"""FitPrune: Ye, Wu, Lin, Zhou, "Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal
Large Language Models", AAAI 2025, arXiv 2409.10197; official code `ywh187/FitPrune` (inference:
`LLaVA_1.5/llava/model/language_model/modeling_llama.py` at 36bb116; recipe search:
`LLaVA_1.5/llava/eval/statistical_analysis.py` at 2b70a5d).

The paper fits a pruning *recipe* offline (how many visual tokens each LLM layer deletes) so that the
attention distributions of the pruned model stay close to the full model's within a FLOPs budget, then
applies it at inference. The paper's full text could not be read here; the steps follow METHODS.md §6
("FitPrune") and the official code.

Offline (`scripts/fitprune_recipe.py`, METHODS §6 steps 1-3): on calibration samples record, per layer,
the head-max attention masses of the full model; binary-search alpha so that each layer deletes the
intersection of the two low-score prefixes whose removal keeps (1 - alpha) of the full model's cross
and self mass, until the predicted FLOPs meet the reduction target rho; the recipe is the per-layer
deletion count averaged over the samples (integer division).

Inference (this file, METHODS §6 "Inference"), at every LLM layer l whose recipe count k_l > 0:
  1. Attention of layer l, reduced over heads by MAX (`state.attention(..., heads="max")`: the probe
     rebuilds the rows from the layer's own queries and keys; the model stays on SDPA).
  2. Self score s_j = sum over the image queries v of A[v, j] / |V| (how much the image attends to j);
     cross score c_j = sum over the text queries t of A[t, j]. Text queries are the tokens after the
     image (question and " ASSISTANT:"), as official (rows 35 + 576 onwards); the system prompt is not.
  3. Delete the k_l visual tokens with the smallest c_j * s_j. The cut sits where the official code
     puts it, inside layer l after its attention (`llm_hook_point = "attn"`): layer l's KV cache keeps
     every token its attention saw, its MLP and every later layer see the shorter sequence.
  4. Kept tokens keep their original position ids (official `position_ids[:, topk_idx]`).

Recipes. `recipe` is a list of per-layer deletion counts per image, index = layer, for a decoder as
deep as the list. `preset` names one of the official LLaVA-1.5-7B recipes (`OFFICIAL_RECIPES`, FLOPs
reduction rho = 10..90 %, copied from the official `modeling_llama.py`; the official eval script runs
rho = 60, the default here). A recipe for another depth is mapped with `pruners.base.scale_layers`
(layer l -> round(l * depth / len(recipe))), counts that land on the same layer add up, and counts
at the last layer move to the layer before it (the runtime cuts after layers 0..depth-2 only; the
official recipes delete nothing at layer 31). A preset, made for 576 visual tokens, deletes
round(total * N / 576) tokens on a model with N per image, spread over the layers in proportion to
its counts (cumulative rounding, `distribute`).

Budget mode (`budget`, ours: the paper has none). vtprune's budget is the number of visual tokens per
image reaching the LLM's last layer. A recipe *shape* is scaled so that its deletions sum to exactly
N - budget (after the depth mapping, `distribute`: layer l's count is the rounded cumulative share
minus the previous one, so the total is exact). The shape is `recipe` or `preset` when given, else
the official preset whose final count is nearest to the budget's share of N (576 * b / N against
576 - sum(preset); ties to the milder preset): 64, 128 and 192 of 576 use the rho = 80, 60 and 50
recipes, whose own final counts are 62, 127 and 173. Every budget 1..N is met exactly.

Deviations from the official code:
  * Float32 head-max attention from the probe (official: fp16 eager attention weights).
  * Batch-1 code with a hard-coded 35-token system prompt and 576 image tokens; here the image and
    text spans are found per sample in a left-padded batch, so batched equals one-by-one. A sample
    with several images deletes k_l tokens per image from all of them jointly; its text queries are
    the tokens after its last image token.
  * Ties in c * s keep the earlier token (stable sort); `torch.sort` leaves their order unspecified.
  * Counts at the last layer of a recipe move to the layer before it (see Recipes).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index, topk_visual
from ..registry import register

PAPER_VISUAL_TOKENS = 576  # LLaVA-1.5's visual tokens per image, for which the presets were fitted
ROW_CHUNK = 256  # query rows per probe call: bounds the (B, heads, rows, N) float32 buffer

# Official LLaVA-1.5-7B recipes (32 layers), by target FLOPs reduction rho in percent: visual tokens
# deleted per layer. Source: ywh187/FitPrune, LLaVA_1.5/llava/model/language_model/modeling_llama.py
# (`delete_scheme`); ywh187/FitPrune's eval script runs rho = 60.
# fmt: off
OFFICIAL_RECIPES: dict[int, tuple[int, ...]] = {
    10: (0, 0, 1, 2, 1, 0, 1, 4, 5, 5, 11, 4, 2, 2, 0, 0, 1, 1, 2, 4, 2, 10, 1, 1, 1, 2, 1, 1, 0, 1, 0, 0),
    20: (0, 0, 3, 3, 1, 1, 4, 16, 14, 15, 24, 4, 2, 3, 2, 0, 6, 0, 5, 13, 4, 19, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0),
    30: (0, 0, 7, 6, 4, 5, 16, 40, 24, 21, 24, 4, 2, 3, 4, 0, 16, 0, 11, 26, 6, 32, 3, 1, 0, 1, 2, 2, 4, 0, 0, 0),
    40: (0, 1, 21, 13, 14, 11, 41, 53, 29, 15, 14, 5, 1, 4, 5, 1, 26, 1, 13, 28, 6, 27, 2, 1, 0, 0, 1, 1, 2, 0, 0,
         0),
    50: (3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0),
    55: (6, 17, 69, 31, 34, 19, 59, 30, 23, 6, 8, 7, 2, 5, 8, 2, 29, 4, 12, 25, 4, 19, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0),
    60: (14, 33, 89, 36, 36, 20, 55, 21, 18, 4, 7, 5, 2, 5, 7, 4, 26, 5, 11, 24, 4, 18, 2, 1, 0, 0, 1, 0, 1, 0, 0,
         0),
    70: (48, 79, 118, 41, 33, 17, 36, 9, 9, 2, 3, 2, 1, 3, 4, 8, 18, 7, 8, 20, 4, 13, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0),
    80: (128, 127, 118, 35, 26, 8, 13, 3, 2, 1, 0, 0, 0, 2, 1, 8, 7, 8, 5, 11, 2, 6, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0),
    90: (262, 153, 80, 19, 13, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0),
}
# fmt: on
DEFAULT_PRESET = 60


def attention_scores(state: TokenState) -> tuple[Tensor, Tensor, Tensor]:
    """FitPrune's two head-max attention scores of every slot at this layer.

    Returns:
        cross (B, N): sum over the text queries t of A[t, j] (text = valid non-visual slots after the
            sample's last visual slot);
        self (B, N): sum over the visual queries v of A[v, j], divided by the number of visual tokens;
        text (B,): the number of text queries.
    Only visual columns are meaningful to the caller; padding rows never contribute.
    """
    bsz, n = state.valid.shape
    slots = torch.arange(n, device=state.valid.device)
    visual = state.visual & state.valid
    last_visual = torch.where(visual, slots, -1).amax(-1, keepdim=True)
    text = state.valid & ~state.visual & (slots > last_visual)
    rows = compact_index(visual | text)  # (B, R) query slots, -1 = padding
    is_text = torch.gather(text, 1, rows.clamp(min=0)) & (rows >= 0)
    is_visual = torch.gather(visual, 1, rows.clamp(min=0)) & (rows >= 0)
    cross = torch.zeros(bsz, n, device=state.hidden.device)
    self_sum = torch.zeros(bsz, n, device=state.hidden.device)
    for start in range(0, rows.shape[1], ROW_CHUNK):
        index = rows[:, start : start + ROW_CHUNK]
        attn = state.attention(index.clamp(min=0), heads="max")  # (B, R, N)
        # Select, never multiply: rows of padding slots may hold NaN.
        cross += torch.where(is_text[:, start : start + ROW_CHUNK, None], attn, 0.0).sum(1)
        self_sum += torch.where(is_visual[:, start : start + ROW_CHUNK, None], attn, 0.0).sum(1)
    return cross, self_sum / visual.sum(-1, keepdim=True).clamp(min=1), text.sum(-1)


def map_depth(recipe: Sequence[int], depth: int) -> list[int]:
    """Per-layer counts of a recipe made for a len(recipe)-layer decoder, on a `depth`-layer one.

    Layer l goes to `scale_layers` of l (unchanged when the depths agree); counts that land on the same
    layer add up; counts at the last layer (where the runtime cannot cut) move to layer depth - 2.
    """
    out = [0] * depth
    for layer, count in enumerate(recipe):
        target = scale_layers((layer,), len(recipe), depth)[0]
        out[min(target, depth - 2)] += count
    return out


def distribute(weights: Sequence[int], total: int) -> list[int]:
    """`total` split over the layers in proportion to `weights`, in integers summing to `total` exactly.

    Layer l gets round(total * W_l / W) - round(total * W_{l-1} / W), W_l the cumulative weight (halves
    round up); weights that already sum to `total` come back unchanged.
    """
    whole = sum(weights)
    marks = [(2 * total * w + whole) // (2 * whole) for w in accumulate(weights)]
    return [b - a for a, b in zip([0, *marks[:-1]], marks)]


def nearest_preset(budget: int, visual_tokens: int) -> int:
    """The official preset whose final count per 576 tokens is nearest to `budget` of `visual_tokens`."""
    share = PAPER_VISUAL_TOKENS * budget / visual_tokens

    def gap(rho: int) -> float:
        return abs(PAPER_VISUAL_TOKENS - sum(OFFICIAL_RECIPES[rho]) - share)

    return min(sorted(OFFICIAL_RECIPES), key=gap)


@register
class FitPrune(Pruner):
    """Delete, at the layers of a fitted recipe, the visual tokens with the least head-max attention from
    both the text and the image (smallest c_j * s_j).

    Args:
        budget: visual tokens per image reaching the LLM's last layer (budget mode, ours): the recipe
            shape is scaled to delete exactly N - budget. None: run the recipe as it is.
        recipe: visual tokens deleted per image at each LLM layer (index = layer), for a decoder of
            len(recipe) layers, e.g. written by `scripts/fitprune_recipe.py`. Excludes `preset`.
        preset: an official LLaVA-1.5-7B recipe by FLOPs reduction in percent (`OFFICIAL_RECIPES`:
            10, 20, 30, 40, 50, 55, 60, 70, 80, 90). Default: 60 without a budget (official eval
            script), the nearest preset with a budget (see the module docstring).
    """

    name = "fitprune"
    stages = frozenset({Stage.LLM_LAYER})
    # Deletions per layer are fixed at setup from the image's token count: every image must have that count.
    needs = frozenset({"single_view"})
    llm_hook_point = "attn"  # official: the cut is inside layer l, after its attention

    def __init__(self, budget: int | None = None, recipe: list[int] | None = None, preset: int | None = None) -> None:
        super().__init__(budget)
        if recipe is not None:
            bad = isinstance(recipe, (str, bytes)) or not isinstance(recipe, Sequence) or len(recipe) < 2
            if bad or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in recipe):
                raise ValueError(
                    f"fitprune: recipe must be a list of at least 2 ints >= 0 (deletions per layer), got {recipe!r}"
                )
            if preset is not None:
                raise ValueError(f"fitprune: give recipe or preset, not both (got preset={preset!r})")
        if preset is not None and (isinstance(preset, bool) or preset not in OFFICIAL_RECIPES):
            raise ValueError(
                f"fitprune: preset {preset!r} is not an official recipe; allowed: {sorted(OFFICIAL_RECIPES)}"
            )
        self.recipe = None if recipe is None else [int(k) for k in recipe]
        self.preset = preset
        self.schedule: list[int] = []

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.llm_layers < 2:
            raise ValueError(f"fitprune: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        self.schedule = self._schedule(info)
        self.llm_layers = tuple(layer for layer, k in enumerate(self.schedule) if k > 0)

    def _schedule(self, info: ModelInfo) -> list[int]:
        """Visual tokens deleted per image after each layer of this model."""
        depth, n = info.llm_layers, info.visual_tokens
        if self.budget is not None:
            shape = self.recipe or OFFICIAL_RECIPES[self.preset or nearest_preset(self.budget, n)]
            mapped = map_depth(shape, depth)
            if sum(mapped) == 0:
                if self.budget == n:
                    return mapped
                raise ValueError(
                    f"fitprune: recipe {shape} deletes nothing, so it cannot be scaled to budget "
                    f"{self.budget}; allowed: a recipe with at least one deletion"
                )
            return distribute(mapped, n - self.budget)
        if self.recipe is not None:
            mapped = map_depth(self.recipe, depth)
            if sum(mapped) > n:
                raise ValueError(
                    f"fitprune: recipe deletes {sum(mapped)} visual tokens per image, the model has "
                    f"{n}; allowed: at most {n} in total"
                )
            return mapped
        preset = OFFICIAL_RECIPES[self.preset or DEFAULT_PRESET]
        total = (2 * sum(preset) * n + PAPER_VISUAL_TOKENS) // (2 * PAPER_VISUAL_TOKENS)  # round(sum * n / 576)
        return distribute(map_depth(preset, depth), total)

    def llm_layer(self, state: TokenState) -> TokenState:
        if state.layer is None or state.layer >= len(self.schedule) or self.schedule[state.layer] == 0:
            return state
        images = state.num_images
        if images is None:  # no count given: one image per sample
            images = torch.ones(state.batch_size, dtype=torch.long, device=state.valid.device)
        present = state.visual_count()
        delete = torch.minimum(self.schedule[state.layer] * images.to(present.device), present)
        cross, self_score, _ = attention_scores(state)
        return state.keep(topk_visual(state, cross * self_score, present - delete))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, recipe={self.recipe}, preset={self.preset}, schedule={self.schedule}"
