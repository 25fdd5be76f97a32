"""TokenCarve: Tan et al., "TokenCarve: Information-Preserving Visual Token Compression in Multimodal
Large Language Models", arXiv 2503.10501 (official code `ShawnTan86/TokenCarve`, a replaced
`modeling_llama.py`; read through METHODS.md §4, since the paper text was not available).

A training-free two-stage compression inside the LLM: score every visual token by how much
information it carries (an SVD of the visual hidden states) and how much the prompt attends to it,
prune to 1.5x the target, then merge the lower-ranked survivors most similar to higher-ranked ones.
Steps of this file, for a target of T visual tokens (METHODS.md §4.1-4.3):
  1. Where: prefill, after LLM layer k - 1 = 1 (layers 0-1 see every visual token; the README's
     "between the second and third layers"; official `token_carve_work_layer` = 2 = our `k`).
  2. filter, attention score AV (IPGS module): the head-mean attention probabilities of layer k - 1,
     row of the last prompt token, read on the visual columns. One row from the runtime's probe,
     so the model stays on SDPA (the official code runs the whole model in eager attention).
  3. filter, information score SV (IPGS module): X = the layer's output hidden states of the
     visual tokens (the official code's "attention output matrix" is the decoder-layer output, the
     residual stream; METHODS ⚠), in float32; X = U S V^T; SV_i = ||(U S)_i||_1 = ||x_i V||_1.
  4. filter, rank fusion (Borda count): rank_AV, rank_SV in 0..N-1 (0 = best); IPGS_i =
     w (N - rank_AV(i)) + (1 - w) (N - rank_SV(i)), w = `weight` = 0.5. Modes (official
     `token_carve_SV_AV_mode` 0/1/2): "ipgs" (fusion), "sv" (SV only), "av" (AV only).
  5. Carving Stage I (prune): keep the M = floor(1.5 T) best by IPGS (official int(T / 2 * 3)).
  6. Carving Stage II (merge, guided by IPGS): in IPGS order, A = the first floor(M / 2), B = the
     rest. Each B token finds its most cosine-similar A token; the m = M - T B tokens with the
     highest similarity are merged into their match by a plain mean including the target (several
     B tokens may share a target; the merged token keeps the target's slot, position and origin).
     The other B tokens stay. M - m = T exactly (uncapped, m = floor(T / 2), official int(T / 2)).
  7. Kept tokens stay in their original order with their original position ids (runtime default).
  8. KV cache (METHODS §4.3, the paper's "64% less KV cache"): the caches of layers 0..k-1 are cut
     to the tokens that survived. Done in the DECODE stage at the first decoding step: in every
     layer whose cache still holds visual entries the last layer's cache lacks, only the entries
     whose origin survives in the last layer are kept. A merged token's entry in those layers is
     its target's own (K, V of the target's unmerged state), the sources' entries are dropped: the
     official code likewise re-indexes those caches with the kept indices.

Counting: `budget` is T per image; a sample with several images keeps T * images visual tokens,
chosen jointly over its images (one SVD and one ranking per sample). When 1.5 T exceeds the visual
tokens N of a sample, M = N and m = N - T, so the count stays exactly T; T >= N keeps everything.

Deviations from the official code:
  * Attention comes from a one-row probe, not an eager model with `output_attentions` (same values).
  * The visual columns come from the runtime's image slots, not a fixed `sys_length` of 36
    (METHODS ⚠: off by one for vicuna_v1), and any batch size and image count works (official: batch
    1, one image).
  * The caches of layers 0..k-1 are cut at the first decoding step, not inside prefill. Generation is
    the same; a bare forward call (no decoding step) returns those caches uncut.
  * Ties (frequent in the Borda sum) are broken by stable sorts (the official tie order is not
    known): equal AV, SV or IPGS go to the earlier token; equal similarity to the B token with the
    higher IPGS; a B token equally close to several A tokens joins the one with the higher IPGS.
  * SV_i is computed by default (`solver="gram"`) from the eigendecomposition of the N x N Gram
    matrix X X^T in float64 (U S = Q sqrt(L)), not by the official full SVD (`solver="svd"`): the
    same scores up to rounding (relative 3e-5 at 576 x 4096, the float32 SVD's own error), and 15x
    faster on CPU (0.3 s instead of 4-11 s at 576 x 4096 on 2 cores, where the SVD alone was 27% of
    `make bench`'s unpruned prefill).
  * The merged mean is computed in float32 and cast back to the model dtype.
  * `k` is not rescaled with `scale_layers` on shallower models: the paper's point is a cut right
    after the first two layers (like FastV's K = 2), not a relative depth; scaled to a 4-layer
    model the cut would move to after layer 0.
  * `budget=None` gives the official default of 64 tokens per image (capped at the model's count).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import compact_index, cosine_similarity, merge_weighted, row_rank
from ..registry import register

MODES = ("ipgs", "sv", "av")
SOLVERS = ("gram", "svd")
DEFAULT_BUDGET = 64  # official `token_carve_image_token_nums`


def information_scores(x: Tensor, solver: str = "gram") -> Tensor:
    """SV_i = ||(U S)_i||_1 of the rows of one (N, D) matrix X = U S V^T, in float32."""
    if solver == "svd":
        u, s, _ = torch.linalg.svd(x.float(), full_matrices=False)
        return (u * s).abs().sum(-1)
    x = x.double()
    eigenvalues, q = torch.linalg.eigh(x @ x.T)
    return (q * eigenvalues.clamp_min(0).sqrt()).abs().sum(-1).float()


def borda(av: Tensor, sv: Tensor, real: Tensor, weight: float) -> Tensor:
    """IPGS_i = w (N - rank_AV) + (1 - w) (N - rank_SV), N = real tokens of the row; padding -inf."""
    n = real.sum(-1, keepdim=True)
    score = weight * (n - row_rank(av, real)) + (1 - weight) * (n - row_rank(sv, real))
    return score.float().masked_fill(~real, float("-inf"))


def carve_counts(visual: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: T (capped at N), M = min(floor(1.5 T), N) kept by Stage I, m = M - T merged."""
    target = torch.minimum(target, visual)
    pruned = torch.minimum(target * 3 // 2, visual)
    return target, pruned, pruned - target


@register
class TokenCarve(Pruner):
    """Prune by information and attention ranks to 1.5 T, then merge down to T visual tokens.

    Args:
        budget: T, visual tokens per image after layer k - 1. None: 64 (official default).
        k: first LLM layer with fewer tokens (official `token_carve_work_layer`, 2); the carve runs
            after layer k - 1, whose attention and hidden states it reads.
        mode: "ipgs" (rank fusion, official mode 0), "sv" (information only, 1), "av" (attention only, 2).
        weight: w of the fusion, on the attention ranks (1 - w on the information ranks); 0.5.
        solver: "gram" (default: the scores from the eigendecomposition of X X^T in float64) or
            "svd" (official: torch.linalg.svd of the visual hidden states; same scores, slower).
    """

    name = "tokencarve"
    stages = frozenset({Stage.LLM_LAYER, Stage.DECODE})

    def __init__(
        self, budget: int | None = None, k: int = 2, mode: str = "ipgs", weight: float = 0.5, solver: str = "gram"
    ) -> None:
        super().__init__(budget)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"tokencarve: k must be an int >= 1 (first LLM layer with fewer tokens), got {k!r}")
        if mode not in MODES:
            raise ValueError(f"tokencarve: mode must be one of {MODES}, got {mode!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"tokencarve: weight (w of the rank fusion) must be in [0, 1], got {weight!r}")
        if solver not in SOLVERS:
            raise ValueError(f"tokencarve: solver must be one of {SOLVERS}, got {solver!r}")
        self.k, self.mode, self.weight, self.solver = k, mode, float(weight), solver
        self.llm_layers = (k - 1,)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.k > info.llm_layers - 1:
            raise ValueError(
                f"tokencarve: k={self.k} must leave at least one layer after the cut: allowed 1..{info.llm_layers - 1}"
            )
        self.check_layers(self.llm_layers, info.llm_layers, "llm_layers")
        if self.budget is None:
            self.budget = min(DEFAULT_BUDGET, info.visual_tokens)

    # -- filter: IPGS --------------------------------------------------------------------------
    def ipgs_scores(self, state: TokenState, index: Tensor) -> Tensor:
        """(B, V) IPGS score of the visual slots `index` (B, V) (-1 = padding, first)."""
        real = index >= 0
        safe = index.clamp(min=0)
        av = sv = torch.zeros(real.shape, device=index.device)
        if self.mode != "sv":
            row = state.attention(state.last_index()[:, None])[:, 0]  # (B, N) last prompt token's row
            av = row.gather(1, safe)
        if self.mode != "av":
            sv = self.sv_scores(state, index)
        weight = {"ipgs": self.weight, "sv": 0.0, "av": 1.0}[self.mode]
        return borda(av, sv, real, weight)

    def sv_scores(self, state: TokenState, index: Tensor) -> Tensor:
        """(B, V) SV score of the visual slots `index`: one SVD per sample, on its own rows only."""
        out = torch.zeros(index.shape, device=index.device)
        counts = (index >= 0).sum(-1).tolist()
        width = index.shape[1]
        for b, n in enumerate(counts):  # ragged row counts: SVD does not batch over them
            if n:
                out[b, width - n :] = information_scores(state.hidden[b, index[b, width - n :]], self.solver)
        return out

    # -- the carve -------------------------------------------------------------------------------
    def llm_layer(self, state: TokenState) -> TokenState:
        cand = state.visual & state.valid
        images = state.num_images
        if images is None:  # no count given: one image per sample
            images = torch.ones(state.batch_size, dtype=torch.long)
        n = cand.sum(-1)
        target, pruned, merged = carve_counts(n, self.budget * images.to(n.device))
        if bool((target >= n).all()):
            return state  # keep everything: nothing to prune or merge
        index = compact_index(cand)  # (B, V) visual slots, left-padded with -1
        order = torch.sort(self.ipgs_scores(state, index), dim=-1, descending=True, stable=True).indices
        slots = index.gather(1, order)  # visual slots in IPGS order, padding last
        return self.carve(state, slots, pruned, merged)

    def carve(self, state: TokenState, slots: Tensor, pruned: Tensor, merged: Tensor) -> TokenState:
        """Stages I and II on visual `slots` (B, V) sorted by IPGS (padding, -1, last).

        Keeps the first `pruned` (B,) slots of each row; of those, A = the first pruned // 2 and
        B = the rest; the `merged` (B,) B tokens most similar to their best A token merge into it.
        """
        rank = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
        in_a = rank < (pruned // 2)[:, None]
        in_b = ~in_a & (rank < pruned[:, None])
        safe = slots.clamp(min=0)
        x = state.hidden.gather(1, safe[..., None].expand(-1, -1, state.hidden.shape[-1]))
        # correlate: each B token's most similar A token (cosine of the layer's hidden states)
        sim = cosine_similarity(x, x).masked_fill(~in_a[:, None, :], float("-inf"))
        best, match = sim.max(-1)
        best = best.masked_fill(~in_b, float("-inf"))
        # the m B tokens with the highest similarity merge; ties to the higher IPGS
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        by_sim = torch.empty_like(order).scatter_(1, order, rank)
        merging = in_b & (by_sim < merged[:, None])
        # compress: plain mean of the target and its sources (every size 1)
        ones = torch.ones_like(state.sizes, dtype=torch.float32)
        hidden, sizes = merge_weighted(state.hidden, ones, safe, safe.gather(1, match), merging.float())
        # Back to slots; padding entries write to a spare last column, which is dropped.
        width = state.num_tokens
        spare = torch.where(slots >= 0, slots, width)
        kept = torch.zeros(state.batch_size, width + 1, dtype=torch.bool, device=slots.device)
        kept = kept.scatter(1, spare, (in_a | in_b) & ~merging)[:, :width]
        keep = (state.valid & ~state.visual) | kept
        return state.replace(hidden=hidden, sizes=sizes.to(state.sizes.dtype)).keep(compact_index(keep))

    # -- KV cache of the layers before the cut ---------------------------------------------------
    def decode(self, cache) -> None:
        """At the first decoding step, cut every layer's visual entries to those of the last layer."""
        if cache.step != 0:
            return
        last = cache.slots(cache.num_layers - 1)
        survivors = last.origin.masked_fill(~(last.valid & last.visual), -1)  # (B, T_last)
        for layer in range(cache.num_layers - 1):
            slots = cache.slots(layer)
            present = (slots.origin[:, :, None] == survivors[:, None, :]).any(-1)
            drop = slots.valid & slots.visual & ~present
            if bool(drop.any()):
                cache.keep(layer, compact_index(slots.valid & ~drop))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, k={self.k}, mode={self.mode!r}, weight={self.weight}, solver={self.solver!r}"
