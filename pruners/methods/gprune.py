"""G-Prune: Jiang et al., "What Kind of Visual Tokens Do We Need? Training-free Visual Token Pruning for
Multi-modal Large Language Models from the Perspective of Graph", AAAI 2025, arXiv 2501.02268
(official code `jytmelon/G-Prune`, LLaVA-NeXT only: `llava/model/llava_arch.py`).

Visual tokens are nodes of a graph linked by feature similarity; "information" starts at each node
as its feature norm and flows along the links for a few steps; tokens that collect the most
information per link are kept. Near-duplicates share their information among many links, so a big
uniform region keeps few representatives while a small, distinct region (foreground or background
alike) keeps its own. Steps of this file (METHODS.md §2.1), on one token set F (N x d):
  1. Where: after the projector, before the LLM (VISION_OUTPUT), on the projected features only;
     no attention is used, so the model stays on SDPA / FlashAttention.
  2. Graph: cosine similarity S = F^ F^T of the row-normalised features; an edge wherever
     S >= `similarity` (0.5). Every token keeps its self-loop (S_ii = 1).
  3. Transition matrix: P = row-softmax(S / `temperature`) over the edges, non-edges at a
     logit of -inf (official: -5000, which is exactly 0 after exp in float32 as well).
  4. Propagation: initial information w_i = ||F_i||_2; after `iterations` (5) steps
     r = w^T P^n. Computed as n vector-matrix products, r <- r P, which equals the official
     `matrix_power` result in exact arithmetic at O(n N^2) instead of O(N^3 log n).
  5. Degree normalisation: score_j = r_j / deg_j, deg_j = number of edges of j (self-loop included).
  6. Keep the top `budget` (or floor(keep_ratio * N), 288 of 576) by score, in original order,
     with their original position ids (the runtime's default; official `position_ids = keep_indices`).

One graph per image (METHODS.md §2.3, the LLaVA-1.5 adaptation): the VISION_OUTPUT state has one
row per image, so `graph_scores` runs on each row independently.

LLaVA-NeXT (METHODS.md §2.2, official `llava_arch.py`): the official code builds two separate graphs
per image, one on the base image's tokens and one on the unpadded high-resolution grid, i.e. the
tokens of all the crops together, without the row-end newline tokens (the runtime keeps those, always,
and never counts them). No edge links the base to a crop, nor two images. The runtime hands each view
as its own row (`TokenState.view`, `TokenState.image`); `graphs="official"` (default) joins an image's
crop rows into one token set and keeps the base alone, `graphs="view"` builds one graph per view (per
crop; a variant, not in the official code). Counts per graph: without a budget floor(keep_ratio * n) of
its n tokens (official: int(0.5 * 576) for the base, int(0.5 * rows * cols) for the grid); with a
budget, the sum of its rows' `quota`s (the runtime's split of the image's budget over the views, in
proportion to their tokens), so the whole image keeps exactly `budget`.

Deviations from the official code (all numerical):
  * Everything runs in float32; the official code runs in the model dtype (fp16). In fp16 the
    softmax weight of a weak edge (logit gap up to (1 - 0.5) / 0.03 = 16.7, weight ~6e-8) can flush
    to zero, which drops that edge from `deg` (counted there as P > 0) and from the propagation;
    cosines near the threshold can also flip in fp16. Here `deg` is the number of edges, which
    equals the official count of P > 0 whenever nothing underflows (always at the defaults in
    float32).
  * r is computed by repeated vector-matrix products rather than P^n: same value up to rounding.
  * A zero feature vector (cosine 0 with everything, itself included) keeps only its self-loop;
    the official code would give it a uniform transition row and deg = N. Never met in practice.
  * Ties in score go to the earlier token (stable sort); `torch.topk` leaves their order unspecified.
  * The official LLaVA-NeXT code assumes batch 1 and a fixed system-prompt length of 46; here any
    batch works and the image slots come from the runtime. Its grid graph covers every crop token left by
    unpadding, as here; with a budget instead of its keep ratio the two graphs share the budget as above.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import compact_index, cosine_similarity, top_mask, topk_visual
from ..registry import register

GRAPHS = ("official", "view")  # LLaVA-NeXT: base + one grid graph per image (official), or one per view


def graph_scores(
    features: Tensor, valid: Tensor, similarity: float = 0.5, temperature: float = 0.03, iterations: int = 5
) -> Tensor:
    """G-Prune score r_j / deg_j of every token, one graph per row (METHODS.md §2.1).

    Args:
        features: (B, N, D) token features (one token set per row: an image, or a crop).
        valid: (B, N) bool; invalid slots take no part in the graph and score -inf.
        similarity: edge threshold on cosine similarity (edge where cos >= similarity).
        temperature: softmax temperature of the transition matrix.
        iterations: propagation steps n.

    Returns:
        (B, N) float32 scores.
    """
    x = features.float()
    n = x.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    pair = valid[:, :, None] & valid[:, None, :]
    # The self-loop is always an edge: it keeps every row's softmax defined (also for a zero
    # feature, whose cosine is 0) and makes padding rows an inert one-hot.
    cos = cosine_similarity(x, x)
    edges = (pair & (cos >= similarity)) | eye
    trans = (cos / temperature).masked_fill(~edges, float("-inf")).softmax(-1)  # (B, N, N) row-stochastic
    info = x.norm(dim=-1) * valid  # (B, N) initial information: the feature norm
    for _ in range(iterations):
        info = (info[:, None, :] @ trans)[:, 0]  # r <- r P: information after one more step
    degree = edges.sum(-1)  # >= 1 (self-loop)
    return (info / degree).masked_fill(~valid, float("-inf"))


@register
class GPrune(Pruner):
    """Keep the visual tokens that gather the most information per link on a similarity graph.

    Args:
        budget: visual tokens kept per image. None: floor(keep_ratio * N), as the official code.
        keep_ratio: fraction of each image's tokens kept when budget is None (official 0.5,
            288 of 576); ignored when budget is given.
        similarity: cosine threshold for an edge (official 0.5), in (0, 1].
        temperature: softmax temperature of the transition matrix (official 0.03), > 0.
        iterations: propagation steps (official 5), >= 0 (0: score = norm / degree).
        graphs: on multi-view images (LLaVA-NeXT), "official" (one graph on the base image, one on all its
            crops) or "view" (one graph per view); see the module docstring. Single-view models: one per image.
    """

    name = "gprune"
    stages = frozenset({Stage.VISION_OUTPUT})

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float = 0.5,
        similarity: float = 0.5,
        temperature: float = 0.03,
        iterations: int = 5,
        graphs: str = "official",
    ) -> None:
        super().__init__(budget)
        if graphs not in GRAPHS:
            raise ValueError(f"gprune: graphs must be one of {GRAPHS}, got {graphs!r}")
        self.graphs = graphs
        if not _is_real(keep_ratio) or not 0 < keep_ratio <= 1:
            raise ValueError(f"gprune: keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
        if not _is_real(similarity) or not 0 < similarity <= 1:
            raise ValueError(f"gprune: similarity (cosine edge threshold) must be in (0, 1], got {similarity!r}")
        if not _is_real(temperature) or temperature <= 0:
            raise ValueError(f"gprune: temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"gprune: iterations must be an int >= 0, got {iterations!r}")
        self.keep_ratio, self.similarity = float(keep_ratio), float(similarity)
        self.temperature, self.iterations = float(temperature), iterations

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.budget is None:
            self.budget = math.floor(self.keep_ratio * info.visual_tokens)  # official int(ratio * N)
            if self.budget < 1:
                raise ValueError(
                    f"gprune: keep_ratio {self.keep_ratio} keeps no visual token of {info.visual_tokens}; "
                    f"allowed keep_ratio >= {1 / info.visual_tokens:.4g}"
                )

    def vision_output(self, state: TokenState) -> TokenState:
        candidates = state.visual & state.valid
        if state.view is not None:
            return self._multi_view(state, candidates)
        scores = graph_scores(state.hidden, candidates, self.similarity, self.temperature, self.iterations)
        return state.keep(topk_visual(state, scores, self.budget))

    def _multi_view(self, state: TokenState, candidates: Tensor) -> TokenState:
        """One graph per token set of a multi-view image (module docstring): the set's tokens are gathered
        from its rows (row by row, in slot order), scored and cut on their own, then put back."""
        if self.graphs == "official":  # base alone, the crops of an image together
            key = state.image * 2 + (state.view > 0)
        else:
            key = torch.arange(state.batch_size, device=state.valid.device)
        chosen = torch.zeros_like(candidates)
        for group in key.unique().tolist():
            rows = (key == group).nonzero()[:, 0]
            members = candidates[rows]  # (rows, N)
            tokens = state.hidden[rows][members][None]  # (1, n, D)
            if tokens.shape[1] == 0:
                continue
            if self._budget_arg is None:  # official: int(keep_ratio * n) of this graph's n tokens
                count = math.floor(self.keep_ratio * tokens.shape[1])
            else:
                count = int(state.quota[rows].sum()) if state.quota is not None else self.budget
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            scores = graph_scores(tokens, valid, self.similarity, self.temperature, self.iterations)
            picked = torch.zeros_like(members)
            picked[members] = top_mask(scores, valid, count)[0]
            chosen[rows] = picked
        return state.keep(compact_index((state.valid & ~state.visual) | chosen))

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, keep_ratio={self.keep_ratio}, similarity={self.similarity}, "
            f"temperature={self.temperature}, iterations={self.iterations}, graphs={self.graphs!r}"
        )


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
