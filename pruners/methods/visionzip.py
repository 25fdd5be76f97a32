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

LLaVA-NeXT (multi-view images): the CLS variant runs in every view's CLIP pass (base and each crop, each
with its own CLS), as the official LLaVA-NeXT code does. `budget` counts the whole image; each view keeps
D + C of its share (`TokenState.quota`, the runtime's split of the budget over the views in proportion to
their tokens), C = the paper's share of it: 640 on five views of 576 gives 108 + 20 per view, the official
LLaVA-NeXT setting (`row_counts`). `contextual` is then C per view. Patches that LLaVA-NeXT's unpadding
drops are not candidates. The runtime places tokens by patch (raster order; see `pruners.runtime.llava_next`).

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

Variants: which runs where. The CLS variant above runs on families with a CLS token and hooks inside the
vision encoder (LLaVA-1.5: `needs`). On an encoder without CLS whose family offers the attention among the
visual tokens at VISION_OUTPUT (Qwen2-VL / Qwen2.5-VL: `fallback_needs`), the CLS-free variant runs instead,
chosen in `setup` from `ModelInfo.provides`. VisionZip's authors released a Qwen2.5-VL version (confirmed
by them in `JIA-Lab-research/VisionZip` issues #24 and #25; its code was not in the stored snapshots), and
VisPruner's author describes the rule it shares with VisionZip for encoders without CLS
(`Theia-4869/VisPruner` issue #1): the attention each token receives from all tokens stands in for CLS
attention, computed on the encoder's patches and carried to the merged tokens, and pruning acts on the merged
tokens the LLM sees. As steps of this file (`vision_output`):
  1. Where: VISION_OUTPUT, on each image's merged (2x2) tokens after Qwen's patch merger, since a cut inside
     the encoder would break the merger. The signal is the last encoder block (its output is merged), the
     counterpart of LLaVA's feature layer.
  2. filter, dominant: score_j = mean over every token i of the image of A[i, j] (head mean, the query row
     i included), A = the runtime's `extras["vision_attention"]`: patch attention pooled to merged tokens
     (a merged query row is the mean of its patches' rows, a merged key column the sum over its patches,
     so score_j ranks as the per-patch received attention averaged over the group). Top D are kept.
  3-4. correlate and compress as above (targets every step-th remaining token, cosine of the head-mean keys,
     here each merged token's mean patch key; h_target + mean of the assigned), on the merged features.
  5. budget = D + C merged tokens per image, the same split. Every token stays at its own image slot, a
     contextual token at its target's (`order="raster"`, the default of this variant; "official" is
     rejected): Qwen's M-RoPE ids carry the layout, so a slot is a spatial position. `keep_cls` must stay
     False (there is no CLS).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import compact_index, cosine_similarity, top_mask
from ..registry import register

DEFAULT_BUDGET = 64  # README / paper headline: 54 dominant + 10 contextual
PAPER_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # budget -> (dominant, contextual)
ORDERS = ("official", "raster")
ROW_CHUNK = 256  # query rows per probe call in the CLS-free variant: bounds the probe's buffer


def received_attention(probe, valid: Tensor) -> Tensor:
    """(B, N) mean over the valid query rows i (i = j included) of the head-mean attention A[i, j]."""
    bsz, n = valid.shape
    total = torch.zeros(bsz, n, device=valid.device)
    slots = torch.arange(n, device=valid.device)
    for start in range(0, n, ROW_CHUNK):
        rows = slots[start : start + ROW_CHUNK]
        attn = probe(rows.expand(bsz, -1), heads="mean")  # (B, R, N)
        total += torch.where(valid[:, rows, None], attn, 0.0).sum(1)  # padding rows selected away, never summed
    return total / valid.sum(-1, keepdim=True).clamp_min(1)


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for a budget: the paper's 10-of-64 contextual share, rounded half up."""
    contextual = (5 * budget + 16) // 32  # floor(5 * budget / 32 + 1/2)
    return budget - contextual, contextual


def contextual_targets(remaining: Tensor, count: int | Tensor) -> Tensor:
    """(B, N) bool: of the `remaining` slots (in slot order), every step-th, step = max(1, M // count),
    the first `count` (official: `arange(0, M, step)[:count]`). `count`: an int or (B,) per row."""
    count = torch.as_tensor(count, device=remaining.device).expand(remaining.shape[0])[:, None]
    rank = remaining.long().cumsum(-1) - 1  # rank of each remaining slot among the remaining
    step = (remaining.sum(-1, keepdim=True) // count.clamp_min(1)).clamp_min(1)
    return remaining & (rank % step == 0) & (rank // step < count)


def assign_to_targets(metric: Tensor, targets: Tensor) -> Tensor:
    """(B, N) slot of the target whose metric is most cosine-similar to each slot's (targets: (B, N)
    bool; rows may hold different counts; a row without targets gets slot 0, unused)."""
    width = metric.shape[-1]
    target_slots = compact_index(targets)  # (B, C) ascending, left-padded with -1
    safe = target_slots.clamp(min=0)
    target_metric = torch.gather(metric, 1, safe[..., None].expand(-1, -1, width))
    similarity = cosine_similarity(metric, target_metric).masked_fill((target_slots < 0)[:, None, :], float("-inf"))
    best = similarity.argmax(-1)  # first maximum on ties: the earliest target
    return safe.gather(1, best)


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
            (every token at its own / its target's patch slot). None: "official" for the CLS variant,
            "raster" for the CLS-free one.

    After `setup`, `budget`, `dominant` (patches kept by CLS attention) and `contextual` hold the
    counts for the attached model.
    """

    name = "visionzip"
    stages = frozenset({Stage.VISION_LAYER})
    renumber_positions = True  # the official LLM sequence is contiguous
    needs = frozenset({"cls"})  # dominant tokens by CLS attention inside the encoder
    fallback_needs = frozenset({"vision_attention"})  # CLS-free variant: attention received, at VISION_OUTPUT
    fallback_label = "CLS-free"

    def __init__(
        self,
        budget: int | None = None,
        contextual: int | None = None,
        keep_cls: bool = False,
        order: str | None = None,
    ) -> None:
        super().__init__(budget)
        if contextual is not None and (
            isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0
        ):
            raise ValueError(f"visionzip: contextual must be an int >= 0 or None, got {contextual!r}")
        if not isinstance(keep_cls, bool):
            raise ValueError(f"visionzip: keep_cls must be True or False, got {keep_cls!r}")
        if order is not None and order not in ORDERS:
            raise ValueError(f"visionzip: order must be one of {ORDERS} or None, got {order!r}")
        self.contextual_arg, self.keep_cls, self.order_arg = contextual, keep_cls, order
        self.order = order or "official"
        self.dominant = self.contextual = 0
        self.cls_kept = self.full = self.cls_free = False

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.cls_free = type(self).uses_fallback(info.provides)
        # The variant decides the stage: an instance attribute, read by the runtime after setup.
        self.stages = frozenset({Stage.VISION_OUTPUT}) if self.cls_free else type(self).stages
        self.order = self.order_arg or ("raster" if self.cls_free else "official")
        if self.cls_free:
            self._setup_cls_free(info)
            return
        if not info.has_cls or info.vision_feature_layer < 1:
            raise ValueError(
                f"visionzip: needs a CLS token and at least one vision layer before the features "
                f"(vision_feature_layer {info.vision_feature_layer}, has_cls {info.has_cls}); allowed: "
                f"vision_feature_layer >= 1 with a CLS token"
            )
        self._default_budget(info)
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

    def _default_budget(self, info: ModelInfo) -> None:
        if self.budget is None:
            if DEFAULT_BUDGET > info.visual_tokens:
                raise ValueError(
                    f"visionzip: default budget {DEFAULT_BUDGET} is out of range for this model: "
                    f"allowed 1..{info.visual_tokens}; give a budget"
                )
            self.budget = DEFAULT_BUDGET

    def _setup_cls_free(self, info: ModelInfo) -> None:
        if self.keep_cls or self.order != "raster":
            raise ValueError(
                f"visionzip: keep_cls={self.keep_cls}, order={self.order!r} on an encoder without CLS (CLS-free "
                "variant); allowed: keep_cls=False and order='raster' (or None), each token at its own image slot"
            )
        self._default_budget(info)
        contextual = split_budget(self.budget)[1] if self.contextual_arg is None else self.contextual_arg
        if contextual > self.budget:
            raise ValueError(
                f"visionzip: contextual {contextual} does not fit budget {self.budget}: "
                f"allowed contextual 0..{self.budget}"
            )
        self.contextual, self.dominant = contextual, self.budget - contextual
        self.vision_layers = ()

    def vision_output(self, state: TokenState) -> TokenState:
        """The CLS-free variant (module docstring): dominant by attention received, then contextual merging."""
        probe = state.extras.get("vision_attention")
        if probe is None:
            raise RuntimeError("visionzip: the CLS-free variant needs extras['vision_attention'] from the runtime")
        patches = state.visual & state.valid
        dominant = top_mask(received_attention(probe, state.valid), patches, self.dominant)
        remaining = patches & ~dominant
        targets = contextual_targets(remaining, self.contextual)
        hidden, sizes = state.hidden, state.sizes
        if self.contextual:
            members = remaining & ~targets
            dest = assign_to_targets(probe.keys().mean(1), targets)
            hidden, _ = merge_into_targets(hidden, dest, members, targets)
            sizes = sizes.scatter_add(1, dest, (sizes * members).to(sizes.dtype))
        return state.replace(hidden=hidden, sizes=sizes).keep(compact_index(dominant | targets))

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
        n_dominant, n_contextual = self.row_counts(state)
        # Step 2: dominant = the patches with the highest CLS attention (head mean).
        attention = state.attention(cls_slot[:, None], heads="mean")[:, 0]  # (B, N)
        dominant = top_mask(attention, patches, n_dominant)
        # Steps 3-4: contextual tokens from the rest, merged into evenly spaced targets.
        remaining = patches & ~dominant
        targets = contextual_targets(remaining, n_contextual)
        hidden, sizes = state.hidden, state.sizes
        if targets.any():
            members = remaining & ~targets & targets.any(-1, keepdim=True)
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

    def row_counts(self, state: TokenState) -> tuple[int | Tensor, int | Tensor]:
        """(dominant, contextual) per row: the counts of `setup`, or, where the runtime split each image's budget
        over its views (LLaVA-NeXT, `state.quota`), the same split of each view's share: C = the paper's share of
        it (or `contextual`, capped), D = the rest (less a kept CLS). 640 over 5 views: 108 + 20 per view."""
        if state.quota is None:
            return self.dominant, self.contextual
        room = (state.quota - int(self.cls_kept)).clamp_min(0)
        contextual = (
            split_budget(state.quota)[1] if self.contextual_arg is None else torch.full_like(room, self.contextual_arg)
        )
        contextual = torch.minimum(contextual, room)
        return room - contextual, contextual

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, dominant={self.dominant}, contextual={self.contextual}, "
            f"keep_cls={self.keep_cls}, order={self.order!r}"
        )
