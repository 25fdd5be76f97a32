"""DART: Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in Multimodal
Language Models: Duplication Matters More", arXiv 2502.11494 (EMNLP 2025); official code
`ZichenWen1/DART` (LLaVA-1.5: `get_retained_image_token` in its replaced LLaMA model, run by
`scripts/v1_5/eval/*.sh` with `--pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4
--max_num_trunction <budget>`; the same routine is in LightCompress (ex-llmc) `token_reduction/dart.py`).
The paper's method section could not be read here (the stored pages hold its abstract and
introduction), so the steps follow the abstract ("selects a small subset of pivot tokens and then
retains the tokens with low duplication to the pivots") and the official code.

Duplication-Aware Reduction of Tokens: instead of keeping "important" tokens, pick a few pivot
tokens and keep the visual tokens that duplicate them least, so the kept set is diverse. No
attention score is used, so the model stays on SDPA / FlashAttention (the paper's point).
Steps of this file:
  1. Where: prefill, after LLM layer k - 1 (layers 0..k-1 see every token, layer k is the first with
     fewer; official `pruned_layer` K = 2 for LLaVA-1.5). `k` is given for Vicuna-7B's 32 layers and
     mapped to other depths with `pruners.base.scale_layers`, then clipped to 0..depth-2 (a cut
     after the last layer changes nothing): the hook after layer 1 of 32 is after layer 0 of 4.
  2. Pivots (paper: "a small subset of pivot tokens"; official criterion `criterion="k_norm"`):
     score every token by the L1 norm of its key at layer k - 1 (post-RoPE, all heads concatenated;
     the runtime's `extras["keys"]`). The `image_pivots` (4) best-scoring visual tokens of an image
     and the `text_pivots` (4) best-scoring text tokens after the sample's last visual token (the
     question and " ASSISTANT:", not the system prompt) are the pivots. Image pivots are kept; text
     pivots only guide the choice. `criterion="hidden_norm"`: the L2 norm of the hidden states.
  3. Duplication (cosine similarity of two tokens): cos(pivot, token) on the layer's output
     hidden states after the decoder's final RMSNorm, as official (`features="normed"`; see the
     deviation below), or on the raw hidden states (`features="hidden"`).
  4. Retained tokens: the pivots are visited one after another; each takes, from the visual tokens
     of its image not taken yet (image pivots excluded), the `quota` least duplicated ones (lowest
     cosine to it). Kept = image pivots + every token taken. Visit order (`order`): "official" is
     the iteration order of a Python set of the pivots' sequence indices (official
     `for item in list(set(image_indices + query_indices))`); "score" visits image pivots then text
     pivots, each by descending score.
  5. Kept tokens keep their original order and position ids (official `position_ids = keep_indexs`),
     the runtime's default. Text tokens are never dropped.

Counting (`count`). "exact" (default): exactly `budget` visual tokens per image reach the last layer,
the paper's 64 / 128 / 192 (88.9 / 77.8 / 66.7% reduction of 576). With P = the pivots present and
S = budget - image pivots tokens to take, the pivots in visit order take floor(S / P) each and the
first S mod P one more. A budget at or below `image_pivots` keeps the `budget` best-scoring image
tokens only. "official": each pivot takes floor(budget / (image_pivots + text_pivots)) tokens, so
image_pivots + 8 * floor(budget / 8) tokens remain (official `TOKEN_TOPK = max_num_trunction // 8`:
132 for 128, 68 for 64, 196 for 192); `visual_tokens` then reports that count, not `budget`.

Images (`segment`). "image" (default): every image of a sample is its own token set with its own
image pivots and budget, sharing the sample's text pivots. "sample": all visual tokens of a sample
form one set (budget x images, `image_pivots` pivots in all), as the official LLaVA-NeXT code treats
the crops of its one image. The official LLaVA-1.5 code takes one image, where the two agree.

Deviations from the official code:
  * `count="exact"` (default) meets `budget` exactly, spreading the remainder over the first pivots
    visited; the official code keeps `image_pivots` tokens more (`count="official"`).
  * `features="normed"` needs the decoder's final norm, which the runtime does not offer yet (a
    pruner knows no model). Until `extras["final_norm"]` exists the raw hidden states are used, with
    a warning. cos(norm(x), norm(y)) = cos(w * x, w * y) for RMSNorm weight w, so it matters only
    through w.
  * The official code is batch 1 with a fixed image offset of 35; here spans come from the runtime,
    per sample, and any batch works. Samples with fewer than `text_pivots` text tokens after the
    image use those they have (official: an error).
  * Cosines are computed in float32 (official: model dtype); ties go to the earlier token (stable
    sorts; `torch.topk` leaves their order open).
  * `budget=None` drops round(N * `ratio`) tokens, ratio 0.778 (the README's example: 128 of 576).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index, cosine_similarity, row_rank
from ..registry import register

PAPER_LLM_DEPTH = 32  # Vicuna-7B, for which K = 2 is given
CRITERIA = ("k_norm", "hidden_norm")
FEATURES = ("normed", "hidden")
ORDERS = ("official", "score")
SEGMENTS = ("image", "sample")
COUNTS = ("exact", "official")


def set_order(keys: list[int]) -> list[int]:
    """Positions of `keys` in the order a Python set of them iterates (the official visit order)."""
    where = {key: i for i, key in enumerate(keys)}
    return [where[key] for key in set(keys)]


def take_least_duplicated(sim: Tensor, order: Tensor, quota: Tensor, free: Tensor) -> Tensor:
    """Step 4: pivots in visit order each take their `quota` least similar free tokens.

    Args:
        sim: (G, P, W) cosine of each pivot to each token of its set.
        order: (G, P) pivot visited at each step (-1: none).
        quota: (G, P) tokens taken at each step.
        free: (G, W) bool, tokens that may be taken (set members, image pivots excluded).

    Returns:
        (G, W) bool, the tokens taken.
    """
    taken = torch.zeros_like(free)
    rows = torch.arange(sim.shape[0], device=sim.device)
    for step in range(order.shape[1]):
        pivot = order[:, step]
        duplication = sim[rows, pivot.clamp(min=0)]  # (G, W)
        pick = free & (row_rank(-duplication, free) < quota[:, step, None]) & (pivot >= 0)[:, None]
        taken |= pick
        free = free & ~pick
    return taken


@register
class DART(Pruner):
    """Keep pivot tokens and the visual tokens least duplicated by them, after LLM layer k - 1.

    Args:
        budget: visual tokens kept per image (see `count`). None: round(N * (1 - ratio)).
        k: first LLM layer with fewer tokens, for a 32-layer decoder (official `pruned_layer` 2).
        ratio: fraction of visual tokens dropped when budget is None (0.778: 128 of 576).
        image_pivots: pivots among an image's visual tokens (official `pivot_image_token` 4), >= 1.
        text_pivots: pivots among the text after the image (official `pivot_text_token` 4), >= 0.
        criterion: pivot score, "k_norm" (official: L1 norm of the layer's keys) or "hidden_norm"
            (L2 norm of the layer's output hidden states).
        features: what duplication is measured on, "normed" (official: hidden states after the
            decoder's final norm) or "hidden" (raw hidden states).
        order: pivot visit order, "official" (Python set order of the sequence indices) or "score".
        segment: "image" (each image its own token set) or "sample" (a sample's images together).
        count: "exact" (budget tokens per image) or "official" (image_pivots + P * (budget // P)).
    """

    name = "dart"
    stages = frozenset({Stage.LLM_LAYER})

    def __init__(
        self,
        budget: int | None = None,
        k: int = 2,
        ratio: float = 0.778,
        image_pivots: int = 4,
        text_pivots: int = 4,
        criterion: str = "k_norm",
        features: str = "normed",
        order: str = "official",
        segment: str = "image",
        count: str = "exact",
    ) -> None:
        super().__init__(budget)
        if _not_int(k) or not 1 <= k < PAPER_LLM_DEPTH:
            raise ValueError(f"dart: k (first LLM layer with fewer tokens, of 32) must be an int in 1..31, got {k!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"dart: ratio (fraction of visual tokens dropped) must be in [0, 1), got {ratio!r}")
        if _not_int(image_pivots) or image_pivots < 1:
            raise ValueError(f"dart: image_pivots must be an int >= 1, got {image_pivots!r}")
        if _not_int(text_pivots) or text_pivots < 0:
            raise ValueError(f"dart: text_pivots must be an int >= 0, got {text_pivots!r}")
        for arg, value, allowed in (
            ("criterion", criterion, CRITERIA),
            ("features", features, FEATURES),
            ("order", order, ORDERS),
            ("segment", segment, SEGMENTS),
            ("count", count, COUNTS),
        ):
            if value not in allowed:
                raise ValueError(f"dart: {arg} must be one of {allowed}, got {value!r}")
        self.k, self.ratio = k, float(ratio)
        self.image_pivots, self.text_pivots = image_pivots, text_pivots
        self.criterion, self.features, self.order, self.segment, self.count = criterion, features, order, segment, count

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.llm_layers < 2:
            raise ValueError(f"dart: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        (hook,) = scale_layers((self.k - 1,), PAPER_LLM_DEPTH, info.llm_layers)
        self.llm_layers = (min(hook, info.llm_layers - 2),)
        n = info.visual_tokens
        if self.budget is None:
            self.budget = math.floor(n * (1 - self.ratio) + 0.5)  # halves round up
            if self.budget < 1:
                raise ValueError(
                    f"dart: ratio {self.ratio} keeps no visual token of {n}; allowed ratio < {1 - 0.5 / n:.4f}"
                )
        if self.count == "official" and self.official_count(self.budget) > n:
            pivots = self.image_pivots + self.text_pivots
            top = min(n, pivots * ((n - self.image_pivots) // pivots) + pivots - 1)
            raise ValueError(
                f"dart: count='official' keeps {self.official_count(self.budget)} tokens for budget {self.budget}, "
                f"more than the {n} of an image; allowed budget 1..{top}"
            )

    def official_count(self, budget: int) -> int:
        """Visual tokens the official code keeps for `max_num_trunction` = budget."""
        pivots = self.image_pivots + self.text_pivots
        return self.image_pivots + pivots * (budget // pivots)

    # -- filter: pivot scores and duplication features ---------------------------------------------
    def scores(self, state: TokenState) -> Tensor:
        """(B, L) pivot score of every slot."""
        if self.criterion == "hidden_norm":
            return state.hidden.float().norm(dim=-1)
        keys = state.extras.get("keys")
        if keys is None:
            raise RuntimeError("dart: criterion='k_norm' needs the layer's keys (extras['keys']) from the runtime")
        return keys.float().abs().sum(dim=(1, 3))  # (B, kv_heads, L, head_dim) -> L1 over heads and dims

    def duplication_features(self, state: TokenState) -> Tensor:
        """(B, L, D) float32 features whose cosine is the duplication."""
        hidden = state.hidden
        if self.features == "normed":
            norm = state.extras.get("final_norm")
            if norm is None:
                warnings.warn(
                    "dart: the runtime offers no extras['final_norm']; duplication is measured on the raw "
                    "hidden states",
                    stacklevel=2,
                )
            else:
                hidden = norm(hidden)
        return hidden.float()

    # -- token sets ----------------------------------------------------------------------------
    def token_sets(self, state: TokenState) -> tuple[Tensor, Tensor, Tensor]:
        """The visual token sets (one per image, or per sample): slots (G, W) (-1 = padding),
        the sample of each set (G,) and its budget (G,)."""
        vis = state.visual & state.valid
        sample, slot = vis.nonzero(as_tuple=True)  # row-major: by sample, then slot
        device = slot.device
        per_sample = vis.sum(-1)
        start = per_sample.cumsum(0) - per_sample
        rank = torch.arange(slot.numel(), device=device) - start[sample]
        images = state.num_images
        images = torch.ones_like(per_sample) if images is None else images.to(device)
        if self.segment == "image" and self.info is not None:
            member = sample * (int(per_sample.max()) + 1) + rank // self.info.visual_tokens
        else:
            member = sample
        _, group, size = torch.unique_consecutive(member, return_inverse=True, return_counts=True)
        first = size.cumsum(0) - size
        slots = torch.full((size.numel(), int(size.max())), -1, dtype=torch.long, device=device)
        slots[group, torch.arange(slot.numel(), device=device) - first[group]] = slot
        owner = sample[first]
        budget = torch.full_like(size, self.budget)
        if self.segment == "sample":
            budget = budget * images[owner].clamp(min=1)
        return slots, owner, torch.minimum(budget, size)

    def text_pivot_slots(self, state: TokenState, scores: Tensor) -> Tensor:
        """(B, text_pivots) slots of the best-scoring text tokens after each sample's last visual
        token, by descending score (-1 where a sample has fewer)."""
        slots = torch.arange(state.num_tokens, device=scores.device).expand_as(state.valid)
        last_visual = torch.where(state.visual & state.valid, slots, -1).amax(-1, keepdim=True)
        text = state.valid & ~state.visual & (slots > last_visual)
        rank = row_rank(scores, text)
        order = rank.argsort(-1)[:, : self.text_pivots]  # slots by rank
        found = torch.gather(text, 1, order)
        return torch.where(found, order, -1)

    # -- the cut -------------------------------------------------------------------------------
    def llm_layer(self, state: TokenState) -> TokenState:
        if not (state.visual & state.valid).any():
            return state
        scores, feats = self.scores(state), self.duplication_features(state)
        slots, owner, budget = self.token_sets(state)
        member = slots >= 0
        safe = slots.clamp(min=0)
        set_scores = scores[owner[:, None], safe]
        # Image pivots: the best-scoring tokens of each set ("exact": the `budget` best when budget <= image_pivots).
        n_image = torch.clamp(budget if self.count == "exact" else member.sum(-1), max=self.image_pivots)
        rank = row_rank(set_scores, member)
        is_pivot = member & (rank < n_image[:, None])
        image_cols = rank.argsort(-1)[:, : self.image_pivots]  # columns by descending score
        first_ones = torch.arange(image_cols.shape[1], device=slots.device) < n_image[:, None]
        image_slots = torch.where(first_ones, torch.gather(slots, 1, image_cols), -1)
        text_slots = self.text_pivot_slots(state, scores)[owner]
        pivots = torch.cat([image_slots, text_slots], 1)  # (G, P) slots, -1 = none
        order = self.visit_order(state, pivots, owner)
        quota = self.quotas(budget, n_image, (pivots >= 0).sum(-1), order.shape[1])
        sim = cosine_similarity(feats[owner[:, None], pivots.clamp(min=0)], feats[owner[:, None], safe])
        taken = take_least_duplicated(sim, order, quota, member & ~is_pivot)
        keep = state.valid & ~state.visual
        kept = (is_pivot | taken) & member
        keep[owner[:, None].expand_as(slots)[kept], slots[kept]] = True
        return state.keep(compact_index(keep))

    def visit_order(self, state: TokenState, pivots: Tensor, owner: Tensor) -> Tensor:
        """(G, P) index into `pivots` of the pivot visited at each step (-1 after the last)."""
        present = pivots >= 0
        steps = torch.arange(pivots.shape[1], device=pivots.device)
        if self.order == "score":  # image pivots, then text pivots, each already by descending score
            ranked = torch.where(present, steps, steps + pivots.shape[1]).sort(-1).values
            return torch.where(ranked < pivots.shape[1], ranked, -1)
        # Official: sequence index within the sample (origin minus the sample's first real slot).
        first = state.origin.masked_fill(~state.valid, torch.iinfo(torch.long).max).amin(-1)
        index = state.origin[owner[:, None], pivots.clamp(min=0)] - first[owner][:, None]
        rows = []
        for idx, ok in zip(index.tolist(), present.tolist()):
            keys = [i for i, p in zip(idx, ok) if p]
            cols = [c for c, p in enumerate(ok) if p]
            rows.append([cols[j] for j in set_order(keys)] + [-1] * (len(ok) - len(keys)))
        return torch.tensor(rows, dtype=torch.long, device=pivots.device)

    def quotas(self, budget: Tensor, n_image: Tensor, n_pivots: Tensor, width: int) -> Tensor:
        """(G, P) tokens each visit step takes (see `count` in the module docstring)."""
        steps = torch.arange(width, device=budget.device)
        if self.count == "official":
            each = budget // (self.image_pivots + self.text_pivots)
            return torch.where(steps < n_pivots[:, None], each[:, None], 0)
        share = budget - n_image
        p = n_pivots.clamp(min=1)[:, None]
        return torch.where(steps < n_pivots[:, None], share[:, None] // p + (steps < share[:, None] % p), 0)

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, k={self.k}, image_pivots={self.image_pivots}, text_pivots={self.text_pivots}, "
            f"criterion={self.criterion!r}, features={self.features!r}, order={self.order!r}, "
            f"segment={self.segment!r}, count={self.count!r}"
        )


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
