"""VisionZip: Yang, Chen, Tian, Wang, Zhao, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025, arXiv 2412.04467 (official code `dvlab-research/VisionZip`,
`visionzip/{clip_encoder,utils,main}.py`).

Inside CLIP, at the layer whose output LLaVA feeds the projector (layer 22 of CLIP-L's 24 with
`vision_feature_layer=-2`; the official code's `attentions[-2]`, `hidden_states[-2]`,
`layers[-2].metric`), the patch tokens are compressed to D dominant + C contextual tokens before the
projector; the LLM is untouched. Steps of this file (paper Sec. 3, "dominant token selection" and
"contextual tokens merging"; the full paper text was not readable here, so the details follow the
official code as METHODS.md §6 "VisionZip" records it, checked against that code):

  1. Where: a VISION_LAYER hook after that layer (`vision_layers = (vision_feature_layer - 1,)`,
     whole block), so its output are the LLM's features. The layer is defined by the feature layer,
     not by a fixed index, so no `scale_layers` is needed (layer 1 of the 3-layer test CLIP).
  2. filter, "dominant token selection": the CLS row of that layer's attention probabilities,
     averaged over heads (official: summed; the ranking is the same), read on the patch columns.
     The D patches with the highest CLS attention are kept unchanged. The row comes from the
     runtime's probe (this layer's captured queries and keys), so CLIP stays on SDPA.
  3. correlate, "contextual token merging": the M patches left are the candidates, in raster order.
     Targets = every step-th of them, step = max(1, M // C), the first C. Every other candidate is
     assigned to the target whose key is most cosine-similar; the key ("metric") is this layer's
     key projection averaged over heads, as official.
  4. compress: contextual token = h_target + mean(h of the candidates assigned to it), the official
     `target_hidden + aggregated_hidden` (a target with nothing assigned stays h_target). Note this
     is not the average of the target with its group: the target enters with weight 1, the group's
     mean with weight 1. `sizes` of a contextual token = 1 + tokens assigned.
  5. Output D + C tokens per image (D counts CLS when it is kept, see below), so `budget` = D + C
     visual tokens reach the LLM's input and, untouched, its last layer.

Budget split (`split_budget`): the paper's pairs are 54+10 (64), 108+20 (128), 162+30 (192), i.e.
C = 5/32 of the budget. Any other budget gets C = floor(5 * budget / 32 + 1/2) (half up) and
D = budget - C: 32 -> 27 + 5 on the 64-token test model; budgets 1..3 get C = 0 (dominant only).
`contextual` sets C explicitly instead.

CLS (`keep_cls`). The official code keeps CLS as one of the D dominant tokens (CLS + top D-1
patches) and passes it to the LLM (METHODS.md §6 ⚠), whereas LLaVA-1.5 itself never feeds CLS
(the "default" feature strategy, which vtprune's runtime follows). Default `keep_cls=False`: D
patches, the LLM sees only patch-derived tokens as in unpruned LLaVA. `keep_cls=True` is the official
variant: CLS + D-1 patches; this hook marks the kept CLS as visual so the runtime's "default"
strategy passes it on, and with `order="official"` it takes the image's first slot (with
`order="raster"` there is no slot for it under "default", so that pairing is rejected). Under the
"full" feature strategy the runtime always feeds CLS (as image token 0), so there CLS always counts
as one of the D dominant tokens, whatever `keep_cls` says.

Token order (`order`). The runtime puts every image token in the image slot its `positions` names.
"official" (default) reproduces the official sequence [CLS if kept, dominant patches in raster
order, contextual tokens in target order] at consecutive slots from the image's first slot.
"raster" keeps each dominant patch at its own patch slot and each contextual token at its target's
slot, so tokens stay in raster order with their original position ids; at `budget` = all tokens it
reproduces the unpruned model exactly ("official" then permutes the tokens).

Deviations from the official code:
  * None in positions: the LLM sequence is contiguous, as official (`renumber_positions`: the text after
    the image follows the last kept image token).
  * CLS dropped by default (above); `keep_cls=True` restores the official behaviour.
  * float32 scoring and merging (official: model dtype); ties in CLS attention go to the earlier
    patch (official `topk` leaves them unspecified), ties in key similarity to the earlier target.
  * Any batch size; each image is compressed on its own (the official code is batch-generic too).
  * The official interface `visionzip(model, dominant=d, contextual=c)` (d counting CLS) is
    `budget=d + c, contextual=c, keep_cls=True` here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import cosine_similarity, top_mask
from ..registry import register

DEFAULT_BUDGET = 64  # README / paper headline: 54 dominant + 10 contextual
PAPER_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # budget -> (dominant, contextual)
ORDERS = ("official", "raster")


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for a budget: the paper's 10-of-64 contextual share, rounded half up."""
    contextual = (5 * budget + 16) // 32  # floor(5 * budget / 32 + 1/2)
    return budget - contextual, contextual


def contextual_targets(remaining: Tensor, count: int) -> Tensor:
    """(B, N) bool: of the `remaining` slots (in slot order), every step-th, step = max(1, M // count),
    the first `count` (official: `arange(0, M, step)[:count]`)."""
    if count == 0:
        return torch.zeros_like(remaining)
    rank = remaining.long().cumsum(-1) - 1  # rank of each remaining slot among the remaining
    step = (remaining.sum(-1, keepdim=True) // count).clamp_min(1)
    return remaining & (rank % step == 0) & (rank // step < count)


def assign_to_targets(metric: Tensor, targets: Tensor) -> Tensor:
    """(B, N) slot of the target whose metric is most cosine-similar to each slot's (targets: (B, N)
    bool, the same count in every row)."""
    bsz, n, width = metric.shape
    slots = torch.arange(n, device=metric.device).expand(bsz, n)
    target_slots = slots[targets].view(bsz, -1)  # (B, C), ascending
    target_metric = torch.gather(metric, 1, target_slots[..., None].expand(-1, -1, width))
    best = cosine_similarity(metric, target_metric).argmax(-1)  # first maximum on ties
    return target_slots.gather(1, best)


def merge_into_targets(hidden: Tensor, dest: Tensor, members: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each target slot becomes h_target + mean(h of the `members` whose `dest` it is).

    Returns the new hidden states (other slots unchanged) and (B, N) members per slot.
    """
    weight = members.float()
    width = hidden.shape[-1]
    sums = torch.zeros_like(hidden, dtype=torch.float32).scatter_add(
        1, dest[..., None].expand(-1, -1, width), hidden.float() * weight[..., None]
    )
    counts = torch.zeros_like(weight).scatter_add(1, dest, weight)
    merged = hidden.float() + sums / counts.clamp_min(1)[..., None]  # official: counts clamped at 1
    return torch.where(targets[..., None], merged.to(hidden.dtype), hidden), counts


@register
class VisionZip(Pruner):
    """Keep the patches CLIP's CLS attends to most and merge the rest into a few contextual tokens.

    Args:
        budget: visual tokens per image reaching the LLM (and its last layer), D + C. None: 64
            (the README's 54 + 10).
        contextual: C, the contextual tokens per image. None: the paper's share, see `split_budget`
            (10 of 64, 20 of 128, 30 of 192). 0 keeps dominant tokens only.
        keep_cls: pass CLS to the LLM as one of the D dominant tokens (official code) instead of D
            patches (default False; see the module docstring).
        order: "official" (dominant then contextual tokens, at consecutive image slots) or "raster"
            (every token at its own / its target's patch slot).

    After `setup`, `budget`, `dominant` (patches kept by CLS attention) and `contextual` hold the
    counts for the attached model.
    """

    name = "visionzip"
    stages = frozenset({Stage.VISION_LAYER})
    renumber_positions = True  # the official LLM sequence is contiguous

    def __init__(
        self,
        budget: int | None = None,
        contextual: int | None = None,
        keep_cls: bool = False,
        order: str = "official",
    ) -> None:
        super().__init__(budget)
        if contextual is not None and (
            isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0
        ):
            raise ValueError(f"visionzip: contextual must be an int >= 0 or None, got {contextual!r}")
        if not isinstance(keep_cls, bool):
            raise ValueError(f"visionzip: keep_cls must be True or False, got {keep_cls!r}")
        if order not in ORDERS:
            raise ValueError(f"visionzip: order must be one of {ORDERS}, got {order!r}")
        self.contextual_arg, self.keep_cls, self.order = contextual, keep_cls, order
        self.dominant = self.contextual = 0
        self.cls_kept = self.full = False

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if not info.has_cls or info.vision_feature_layer < 1:
            raise ValueError(
                f"visionzip: needs a CLS token and at least one vision layer before the features "
                f"(vision_feature_layer {info.vision_feature_layer}, has_cls {info.has_cls}); allowed: "
                f"vision_feature_layer >= 1 with a CLS token"
            )
        if self.budget is None:
            if DEFAULT_BUDGET > info.visual_tokens:
                raise ValueError(
                    f"visionzip: default budget {DEFAULT_BUDGET} is out of range for this model: "
                    f"allowed 1..{info.visual_tokens}; give a budget"
                )
            self.budget = DEFAULT_BUDGET
        # The 'full' strategy feeds CLS as image token 0: then CLS always reaches the LLM.
        self.full = info.visual_tokens == info.grid[0] * info.grid[1] + 1
        self.cls_kept = self.keep_cls or self.full
        if self.cls_kept and not self.full and self.order == "raster":
            raise ValueError(
                "visionzip: keep_cls=True has no image slot for CLS with order='raster' under the 'default' "
                "feature strategy; allowed: order='official' (or keep_cls=False)"
            )
        room = self.budget - int(self.cls_kept)
        contextual = split_budget(self.budget)[1] if self.contextual_arg is None else self.contextual_arg
        if contextual > room:
            raise ValueError(
                f"visionzip: contextual {contextual} does not fit budget {self.budget}"
                f"{' with CLS kept' if self.cls_kept else ''}: allowed contextual 0..{room}"
            )
        self.contextual, self.dominant = contextual, room - contextual
        self.vision_layers = (info.vision_feature_layer - 1,)
        self.check_layers(self.vision_layers, info.vision_layers, "vision_layers")

    def vision_layer(self, state: TokenState) -> TokenState:
        if state.layer not in self.vision_layers:
            return state
        bsz, n = state.valid.shape
        patches = state.visual & state.valid
        cls = state.valid & ~state.visual & (state.positions < 0)
        slots = torch.arange(n, device=state.valid.device).expand(bsz, n)
        if not (cls.sum(-1) == 1).all():
            raise RuntimeError("visionzip: every image needs exactly one CLS token at the hooked layer")
        cls_slot = torch.where(cls, slots, n).amin(-1)
        # Step 2: dominant = the patches with the highest CLS attention (head mean).
        attention = state.attention(cls_slot[:, None], heads="mean")[:, 0]  # (B, N)
        dominant = top_mask(attention, patches, self.dominant)
        # Steps 3-4: contextual tokens from the rest, merged into evenly spaced targets.
        remaining = patches & ~dominant
        targets = contextual_targets(remaining, self.contextual)
        hidden, sizes = state.hidden, state.sizes
        if self.contextual:
            members = remaining & ~targets
            dest = assign_to_targets(state.extras["keys"].mean(1), targets)
            hidden, _ = merge_into_targets(hidden, dest, members, targets)
            sizes = sizes.scatter_add(1, dest, (sizes * members).to(sizes.dtype))
        # Step 5: output in the official order: [CLS], dominant (raster), contextual (target order).
        kept_cls = cls & self.cls_kept
        group = torch.where(kept_cls, 0, torch.where(dominant, 1, torch.where(targets, 2, -1)))
        key = torch.where(group >= 0, group * n + slots, -1)  # dropped slots sort first (left padding)
        sorted_key, order = key.sort(dim=-1, stable=True)
        width = int((group >= 0).sum(-1).max())
        index = order[:, n - width :].masked_fill(sorted_key[:, n - width :] < 0, -1)
        # A kept CLS is flagged visual so the runtime's 'default' strategy passes it to the projector.
        out = state.replace(hidden=hidden, sizes=sizes, visual=state.visual | kept_cls).keep(index)
        if self.order == "official":  # image slot = rank in the official order ('full': CLS at -1 -> slot 0)
            rank = out.valid.long().cumsum(-1) - 1 - int(self.full)
            out.positions = torch.where(out.valid, rank, -1)
        return out

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, dominant={self.dominant}, contextual={self.contextual}, "
            f"keep_cls={self.keep_cls}, order={self.order!r}"
        )
