"""`random`: keep a uniformly random subset of each image's visual tokens (baseline).

Random dropping is a strong baseline for visual-token pruning (DESIGN.md), so it is always in
the table. It acts once, on the projected features of each image (VISION_OUTPUT).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import topk_visual
from ..registry import register


@register
class RandomPruner(Pruner):
    """Keep `budget` visual tokens per image, chosen uniformly at random, in patch order.

    Args:
        budget: visual tokens kept per image. None: a quarter of the image's tokens (144 of
            LLaVA-1.5's 576), the same default as `pool`.
        seed: seed of the draw.

    The subset is drawn once per (seed, token count) and used for every image: the same seed
    picks the same patches in every image of every batch. That makes results independent of
    batch composition and size (batched equals one-by-one), which a per-image stream of random
    numbers would not give. Drawing i.i.d. uniform scores per slot and keeping the top `budget`
    gives a uniformly random subset; ranking through `topk_visual` also respects padding.
    """

    name = "random"
    stages = frozenset({Stage.VISION_OUTPUT})

    def __init__(self, budget: int | None = None, seed: int = 0) -> None:
        super().__init__(budget)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"random: seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._scores: dict[int, Tensor] = {}

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.budget is None:
            self.budget = max(1, info.visual_tokens // 4)

    def slot_scores(self, n: int) -> Tensor:
        """(n,) i.i.d. uniform scores from a generator seeded with `seed`, drawn once per n."""
        if n not in self._scores:
            gen = torch.Generator().manual_seed(self.seed)
            self._scores[n] = torch.rand(n, generator=gen)
        return self._scores[n]

    def vision_output(self, state: TokenState) -> TokenState:
        scores = self.slot_scores(state.num_tokens).to(state.hidden.device).expand(state.batch_size, -1)
        # Multi-view images (LLaVA-NeXT): each view row keeps its share of the image's budget.
        return state.keep(topk_visual(state, scores, state.row_budget(self.budget)))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, seed={self.seed}"
