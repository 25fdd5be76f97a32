"""FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (`pkunlp-icler/FastV`).

Method (paper Sec. 4, "FastV"), as steps of this file:
  1. filter, score: at LLM layer K-1 take the attention probabilities (head mean) and read the
     image columns. The official code reads one row, the last token's (`scoring="last"`); the
     paper's wording is the average attention each image token receives from the other tokens
     (`scoring="mean"`).
  2. filter, choose: keep the top tokens (budget, or round(N * (1 - R)) per image), drop the
     rest, so layer K is the first layer with fewer tokens. Text tokens always stay.
  3. Kept tokens keep their original order and position ids (the "inplace" official version).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import topk_visual
from ..registry import register

SCORINGS = ("last", "mean")
# Query rows per probe call in "mean" scoring: bounds the (B, heads, rows, L) float32 buffer.
ROW_CHUNK = 256


@register
class FastV(Pruner):
    """Drop the visual tokens that receive the least attention at LLM layer k - 1 (prefill).

    Args:
        budget: visual tokens kept per image after layer k - 1. None: use `ratio`.
        k: first LLM layer with fewer tokens (paper's K, default 2); the hook runs after layer k - 1.
        ratio: fraction of visual tokens dropped when budget is None (paper's R, default 0.5):
            keep round(N * (1 - R)) per image, rounding halves up (288 of 576).
        scoring: "last" (official code, default): the last token's attention row.
            "mean" (paper's wording): for each visual token j, the attention it receives from
            every other valid token of the sample, A[i, j] summed over the valid query rows
            i != j (padding rows excluded; the causal mask makes rows i < j zero) and divided
            by (valid tokens - 1). The divisor is the same for every column of a sample, so the
            ranking is that of the column sum.

    A sample with several images keeps budget * num_images visual tokens, chosen jointly.
    """

    name = "fastv"
    stages = frozenset({Stage.LLM_LAYER})

    def __init__(self, budget: int | None = None, k: int = 2, ratio: float = 0.5, scoring: str = "last") -> None:
        super().__init__(budget)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"fastv: k must be an int >= 1 (first LLM layer with fewer tokens), got {k!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"fastv: ratio (fraction of visual tokens dropped) must be in [0, 1), got {ratio!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"fastv: scoring must be one of {SCORINGS}, got {scoring!r}")
        self.k, self.ratio, self.scoring = k, float(ratio), scoring
        self.llm_layers = (k - 1,)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.k > info.llm_layers - 1:
            raise ValueError(
                f"fastv: k={self.k} must leave at least one layer after the cut: allowed 1..{info.llm_layers - 1}"
            )
        self.check_layers(self.llm_layers, info.llm_layers, "llm_layers")
        if self.budget is None:
            # Round halves up: Python's round() would round 0.5 to even.
            self.budget = math.floor(info.visual_tokens * (1 - self.ratio) + 0.5)
            if self.budget < 1:
                raise ValueError(
                    f"fastv: ratio {self.ratio} keeps no visual token of {info.visual_tokens}; "
                    f"allowed ratio < {1 - 0.5 / info.visual_tokens:.4f}"
                )

    def scores(self, state: TokenState) -> Tensor:
        """(B, L) attention score of every slot (only visual slots are read)."""
        if self.scoring == "last":
            return state.attention(state.last_index()[:, None])[:, 0]
        bsz, n = state.valid.shape
        slots = torch.arange(n, device=state.hidden.device)
        total = torch.zeros(bsz, n, device=state.hidden.device)
        for start in range(0, n, ROW_CHUNK):
            rows = slots[start:start + ROW_CHUNK]
            attn = state.attention(rows.expand(bsz, -1))  # (B, R, L)
            # Padding rows may be fully masked (NaN): select, never multiply, to drop them.
            use = state.valid[:, rows, None] & (rows[:, None] != slots[None, :])
            total += torch.where(use, attn, 0.0).sum(1)
        return total / (state.valid.sum(-1, keepdim=True) - 1).clamp_min(1)

    def llm_layer(self, state: TokenState) -> TokenState:
        images = state.num_images
        if images is None:  # no count given: assume one image per sample
            images = torch.ones(state.batch_size, dtype=torch.long, device=state.hidden.device)
        return state.keep(topk_visual(state, self.scores(state), self.budget * images.to(state.hidden.device)))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, k={self.k}, ratio={self.ratio}, scoring={self.scoring!r}"
