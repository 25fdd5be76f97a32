"""ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (`facebookresearch/ToMe`),
applied inside LLaVA's CLIP encoder.

Method (paper Sec. 3), as steps of this file:
  1. Where (Sec. 3, "Strategy"): in every transformer block, between the attention and the MLP
     (`vision_hook_point = "attn"`), merge r tokens.
  2. correlate (Sec. 3, "Token Similarity"): the similarity metric is the keys of that layer's
     attention averaged over heads; cosine similarity (L2-normalised dot product).
  3. correlate (Sec. 3, "Bipartite Soft Matching"): split the patch tokens alternately into sets
     A and B, link each A token to its most similar B token, keep the r strongest links. CLS is
     protected: it is never a candidate.
  4. compress (Sec. 3, "Tracking Token Size"): merge each chosen A token into its B partner by a
     size-weighted average; sizes add up.
  5. Proportional attention (Sec. 3): later layers add log(size) to the attention logits
     (`proportional_attention = True`; the runtime applies it from the sizes kept here).

A merged token keeps the slot and the patch index (`positions`) of its destination B token, so
it enters the LLM where that patch would have; tokens stay in patch order.
"""

from __future__ import annotations

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import bipartite_soft_matching, compact_index, merge_weighted
from ..registry import register

DEFAULT_R = 16


def min_reachable(n: int, layers: int) -> int:
    """Fewest tokens left from n after `layers` layers that each merge the most allowed (n // 2)."""
    for _ in range(layers):
        n -= n // 2
    return n


def merge_schedule(n: int, budget: int, layers: int) -> list[int]:
    """Tokens merged per layer so that exactly `budget` of `n` remain after `layers` layers.

    As even as possible: each layer merges ceil(remaining / layers left), so a remainder goes
    to the earliest layers. When the 50% cap (r <= n // 2) would make the target unreachable
    later on, a layer merges more (front-loading), the least that keeps it reachable.
    Raises ValueError if the budget cannot be reached.
    """
    if budget > n or budget < min_reachable(n, layers):
        raise ValueError(
            f"tome: budget {budget} is not reachable from {n} tokens in {layers} layers merging at most half "
            f"per layer: allowed {min_reachable(n, layers)}..{n}"
        )
    schedule = []
    for i in range(layers):
        need, left = n - budget, layers - i
        r = -(-need // left)
        # Raise r until the layers after this one can still reach the budget.
        while r < n // 2 and min_reachable(n - r, left - 1) > budget:
            r += 1
        r = min(r, n // 2)
        schedule.append(r)
        n -= r
    return schedule


@register
class ToMe(Pruner):
    """Token merging in the vision encoder, so that `budget` tokens per image reach the LLM.

    Args:
        budget: patch tokens per image at the LLM input. The (N - budget) merges are spread over
            the vision layers whose output feeds the LLM (layers 0 .. vision_feature_layer - 1;
            for LLaVA-1.5, layers 0..22 of CLIP's 24), see `merge_schedule`. A budget that the
            50% per-layer cap cannot reach is rejected in `setup`.
        r: the paper's constant-r mode, used when budget is None: merge r tokens in each of
            those layers (fewer where the 50% cap binds). Default 16, giving 576 - 23 * 16 = 208
            tokens for LLaVA-1.5. Give either budget or r, not both.

    After `setup`, `budget` holds the resulting token count in either mode and `schedule` the
    tokens merged by each hooked layer.
    """

    name = "tome"
    stages = frozenset({Stage.VISION_LAYER})
    # One merge schedule for every row, fixed at setup from the image's token count: rows must be whole images.
    needs = frozenset({"single_view"})
    proportional_attention = True

    def __init__(self, budget: int | None = None, r: int | None = None) -> None:
        super().__init__(budget)
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"tome: r (tokens merged per layer) must be an int >= 1 or None, got {r!r}")
        if budget is not None and r is not None:
            raise ValueError(f"tome: give budget ({budget}) or r ({r}), not both")
        self.r = r
        self.vision_hook_point = "attn"
        self.schedule: dict[int, int] = {}

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        n, layers = info.visual_tokens, info.vision_feature_layer
        if self.budget is not None:
            per_layer = merge_schedule(n, self.budget, layers)
        else:
            per_layer = []
            for _ in range(layers):
                per_layer.append(min(self.r or DEFAULT_R, n // 2))
                n -= per_layer[-1]
            self.budget = n
        self.schedule = {layer: r for layer, r in enumerate(per_layer) if r > 0}
        self.vision_layers = tuple(self.schedule)
        self.check_layers(self.vision_layers, info.vision_layers, "vision_layers")

    def vision_layer(self, state: TokenState) -> TokenState:
        r = self.schedule.get(state.layer, 0)
        if r == 0:
            return state
        metric = state.extras["keys"].mean(1)  # (B, N, hd): keys averaged over heads
        candidates = state.visual & state.valid  # CLS (not visual) and padding never merge
        src, dst, _ = bipartite_soft_matching(metric, r, candidates)
        hidden, sizes = merge_weighted(state.hidden, state.sizes, src, dst)
        keep = state.valid.clone()
        keep.scatter_(1, src, False)
        # Merged values replace the old ones in place; `keep` then gathers them with the
        # destination's positions and origin.
        return state.replace(hidden=hidden, sizes=sizes.to(state.sizes.dtype)).keep(compact_index(keep))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, r={self.r}, merged={sum(self.schedule.values())}"
