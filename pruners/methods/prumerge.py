"""LLaVA-PruMerge and PruMerge+: Shang, Cai, Xu, Lee, Yan, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models", arXiv 2403.15388 (2024); official code `42Shawn/LLaVA-PruMerge` (snapshot 097c041,
`llava/model/multimodal_encoder/clip_encoder.py`: `token_prune_merge_advanced` = PruMerge,
`token_prune_merge_advanced_plus` = PruMerge+). Two registry names: ``prumerge`` and ``prumerge-plus``.

Only the abstract, the introduction and third-party notes of the paper could be read (METHODS.md, Sources); the
steps follow METHODS.md §6 and the official code. Both act once, after the projector and before the LLM
(VISION_OUTPUT), on each image separately:

  1. Signal (paper Sec. 3.2, Eq. 1; METHODS §6): the CLS attention of the CLIP layer whose input are LLaVA's features
     (CLIP-L: layer 23, the last, whose input is `hidden_states[-2]`; the official code hooks its q_proj / k_proj).
     a = softmax(q_CLS K^T / sqrt(D)) over every token (CLS included), with q and K the full D-wide projections:
     one attention over the concatenated heads, not a head mean. The runtime's probe of that layer
     (`extras["vision_attention"]`) gives per-head logits q_h k_h / sqrt(D / H); their sum over the H heads divided
     by sqrt(H) is exactly q K^T / sqrt(D). The layer is fixed by the features, so there is no schedule to scale:
     on the tiny 3-layer test tower it is layer 2, the last (`scale_layers` would map 23 of 24 there too).
  2. Filter, adaptive count (Sec. 3.2, Eq. 2, "AITS via outlier detection"): with Q1, Q3 the quartiles of the
     patches' a (linear interpolation, as `np.percentile`), the outliers are the patches with a > Q3 + 1.5 IQR.
     Keep that many patches, those with the highest a (all outliers, as the code's top-k of that count).
  3. Correlate and compress (Sec. 3.3, "token supplement via similar key clustering"): each kept token p takes its
     `k_neighbors` (32) most key-similar other patches (cosine of the same layer's full-width keys, kept and pruned
     alike, as official; fewer if fewer exist) and absorbs them, weighted by their a. All merges read the original
     features. METHODS.md flags (⚠) that the released code leaves the weighted sum unnormalised (the division is
     commented out); the paper speaks of "weighted averaging" (Sec. 1, 3.3), so:
       ``merge="average"`` (default, our reading of the paper): y_p = (a_p x_p + sum_j a_j x_j) / (a_p + sum_j a_j),
       the attention-weighted mean of the cluster {p} + neighbours, on the features' own scale;
       ``merge="official"``: y_p = x_p + sum_j a_j x_j, the released code.
     (Un-commenting the official division would give x_p + sum_j a_j x_j / sum_j a_j, about twice a feature's
     scale; we do not offer it.)
  4. Extra token (official code, not in the paper's description as far as we could read it; kept by default
     because the released code that produced the paper's tables appends it; ``extra_token=False`` drops it): one
     more token carries every pruned patch: sum_j a_j x_j over them ("official") or their attention-weighted mean
     ("average", the same normalisation as step 3).
  5. PruMerge+ (Sec. 3.4; METHODS §6): before step 3 add spatially uniform samples: with r = outliers / N, every
     s-th patch index 0, s, 2s, ... < N - 1 (official: < 575), s = floor(floor(1 / r) / 3), skipping patches
     already kept. Samples merge like the outliers (step 3), and the extra token takes the rest.

Modes. Adaptive (``budget=None``, the paper's): the count per image is the IQR outlier count (+ samples) + the extra
token; on LLaVA-1.5 about 32 (PruMerge) and 144 (PruMerge+). Budget mode (ours; DESIGN.md): exactly `budget` visual
tokens per image reach the LLM: the extra token (when kept and some patch is pruned) takes one place, and the other
S places are the top-S patches by a (PruMerge), or round(`outlier_share` * S) top patches and S - that many samples
spread evenly, in raster order, over the patches not chosen (PruMerge+; 0.25 matches the official proportion: s is
about 1 / (3r), so there are about three samples per outlier). A budget equal to the image's patch count keeps
every patch (all still merge, so it does not reproduce the unpruned model) and adds no extra token.

Token order (``order``). The runtime puts each token in the image slot named by its `positions`. "official"
(default) gives the official sequence [kept by descending a, then samples by patch index, then the extra token]
the image's first slots; "raster" leaves kept tokens at their own patch slots and puts the extra token in the slot
of the last pruned patch. Either way the LLM sees contiguous position ids, as official (`renumber_positions`).

LLaVA-NeXT (multi-view images): each view (base, crops) is scored by its own CLS; in budget mode each view
keeps its share of the image's budget (`TokenState.quota`), the extra token included; patches that unpadding
drops are not candidates; tokens are placed by patch (raster order; see `pruners.runtime.llava_next`).

Deviations from the official code:
  * None in merge space: as the official code, merging runs on the CLIP features (`extras["vision_hidden"]`,
    `hidden_states[-2]`) and the result goes through the model's projector (`extras["projector"]`).
  * The official IQR runs over the whole batch flattened (one count for all images); here each image has its own
    (batched equals one-by-one; the official inference is batch 1, where both agree).
  * Ties (attention, similarity) go to the earlier slot (stable sorts; `torch.topk` leaves them unspecified).
  * PruMerge+ with no outlier (r = 0; official: division by zero) uses r = 1 / N; a stride that rounds to 0
    (r > 1/3; official: `arange` error) is 1.
  * Under the 'full' feature strategy the CLS image token is one more candidate, scored by its self-attention.
  * Token sizes: a kept token keeps its size (neighbourhoods overlap, so absorbed tokens are not a partition); the
    extra token's size is the number of pruned patches. Sizes are only reported; nothing downstream reads them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..ops import compact_index, cosine_similarity, row_rank
from ..registry import register

MERGES = ("average", "official")
ORDERS = ("official", "raster")
IQR_WHISKER = 1.5  # Tukey's fence, as the official `outlier_dectection`
SAMPLE_STRIDE_DIVISOR = 3  # PruMerge+: stride floor(floor(1 / r) / 3)


# ---------------------------------------------------------------- steps on plain tensors


def cls_attention(probe, cls_slot: Tensor, valid: Tensor) -> Tensor:
    """(B, W) softmax(q_CLS K^T / sqrt(D)) over the full width D = H * head_dim (METHODS §6), padding at 0.

    `probe` returns per-head logits q_h k_h / sqrt(D / H); sum_h of them / sqrt(H) = q K^T / sqrt(D).
    """
    logits = probe(cls_slot[:, None], heads="none", logits=True)[:, :, 0]  # (B, H, W)
    full = logits.sum(1) / math.sqrt(logits.shape[1])
    return full.masked_fill(~valid, float("-inf")).softmax(-1)


def iqr_outliers(attn: Tensor, candidates: Tensor) -> Tensor:
    """(B,) number of candidates with attention above Q3 + 1.5 (Q3 - Q1), quartiles per row (paper Eq. 2)."""
    x = attn.double().masked_fill(~candidates, float("nan"))
    q1, q3 = torch.nanquantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device), dim=-1)
    fence = q3 + IQR_WHISKER * (q3 - q1)
    return (candidates & (attn.double() > fence[:, None])).sum(-1)


def spread(pool: Tensor, positions: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: `count` (B,) slots of `pool` spread evenly over it in patch order (count <= pool size).

    With U pool slots ranked r = 0..U-1 by position, the chosen ones are floor(i U / M), i = 0..M-1: rank r is
    chosen iff some integer i lies in [r M / U, (r + 1) M / U), i.e. ceil(r M / U) U < (r + 1) M.
    """
    rank = row_rank(positions, pool, descending=False)
    size = pool.sum(-1, keepdim=True).clamp_min(1)
    m = count[:, None]
    return pool & ((rank * m + size - 1) // size * size < (rank + 1) * m)


def absorb(x: Tensor, attn: Tensor, keys: Tensor, index: Tensor, candidates: Tensor, k: int, merge: str) -> Tensor:
    """(B, K, D): each slot of `index` (B, K) merged with its k most key-similar other candidates (paper Sec. 3.3).

    Args:
        x: (B, N, D) features merged; attn: (B, N) CLS attention (the weights); keys: (B, N, Dk) similarity keys.
        index: (B, K) centre slots, -1 for padding (its row is garbage, for the caller to drop).
        candidates: (B, N) slots that may be absorbed (the centre itself never is).
        merge: "official" x_p + sum_j a_j x_j, or "average" (a_p x_p + sum_j a_j x_j) / (a_p + sum_j a_j).
    """
    safe = index.clamp(min=0)
    rows = torch.gather(keys, 1, safe[..., None].expand(-1, -1, keys.shape[-1]))
    slots = torch.arange(x.shape[1], device=x.device)
    allowed = candidates[:, None, :] & (slots != safe[..., None])  # (B, K, N)
    sim = cosine_similarity(rows, keys).masked_fill(~allowed, float("-inf"))
    neighbours = sim.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # (B, K, k)
    weight = attn.float()[:, None, :].expand_as(sim).gather(-1, neighbours) * allowed.gather(-1, neighbours)
    # A sparse (B, K, N) weight matrix turns the neighbour sums into one batched matmul.
    total = torch.zeros_like(sim).scatter_(-1, neighbours, weight) @ x.float()
    centre = torch.gather(x.float(), 1, safe[..., None].expand(-1, -1, x.shape[-1]))
    if merge == "official":
        return centre + total
    own = torch.gather(attn.float(), 1, safe)
    denom = (own + weight.sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return (own[..., None] * centre + total) / denom[..., None]


def pool_pruned(x: Tensor, attn: Tensor, pruned: Tensor, merge: str) -> Tensor:
    """(B, D) the extra token: sum_j a_j x_j over the pruned slots ("official") or its attention-weighted mean."""
    weight = attn.float() * pruned
    total = (weight[:, None, :] @ x.float())[:, 0]
    if merge == "official":
        return total
    return total / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------- the pruners


@register
class PruMerge(Pruner):
    """Keep the CLS-attention outliers of the last CLIP layer, each merged with its key-similar tokens (+1 token).

    Args:
        budget: visual tokens per image reaching the LLM (budget mode, exact). None: the paper's adaptive IQR count.
        k_neighbors: tokens each kept token absorbs (official 32), >= 1; capped by the other patches available.
        merge: "average" (default; the paper's weighted averaging) or "official" (x_p + unnormalised sum).
        extra_token: append the official extra token carrying the pruned patches (default True).
        order: "official" (default; descending attention, then samples, then the extra token) or "raster".
    """

    name = "prumerge"
    stages = frozenset({Stage.VISION_OUTPUT})
    # CLS attention picks the tokens; merging runs on the encoder features, then the projector.
    needs = frozenset({"cls", "vision_attention", "vision_features"})
    renumber_positions = True  # the official LLM sequence is contiguous

    def __init__(
        self,
        budget: int | None = None,
        k_neighbors: int = 32,
        merge: str = "average",
        extra_token: bool = True,
        order: str = "official",
    ) -> None:
        super().__init__(budget)
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise ValueError(f"{self.name}: k_neighbors must be an int >= 1, got {k_neighbors!r}")
        if merge not in MERGES:
            raise ValueError(f"{self.name}: merge must be one of {MERGES}, got {merge!r}")
        if not isinstance(extra_token, bool):
            raise ValueError(f"{self.name}: extra_token must be True or False, got {extra_token!r}")
        if order not in ORDERS:
            raise ValueError(f"{self.name}: order must be one of {ORDERS}, got {order!r}")
        self.k_neighbors, self.merge, self.extra_token, self.order = k_neighbors, merge, extra_token, order

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.vision_feature_layer >= info.vision_layers:
            raise ValueError(
                f"{self.name}: needs the vision layer that takes the features as input (its CLS attention and keys), "
                f"but vision_feature_layer {info.vision_feature_layer} is the encoder's output; "
                f"allowed 0..{info.vision_layers - 1}"
            )

    # -- selection (filter) --------------------------------------------------------------------------------------
    def _counts(self, attn: Tensor, candidates: Tensor, budget: int | Tensor | None) -> tuple[Tensor, Tensor]:
        """(B,) tokens kept by attention and (B,) uniform samples (PruMerge+ budget mode; else 0). `budget`: each
        row's places in budget mode (the image's budget, or a view's share of it on LLaVA-NeXT)."""
        n = candidates.sum(-1)
        if self.budget is None:
            outliers = iqr_outliers(attn, candidates)
            return outliers, torch.zeros_like(outliers)
        places = torch.minimum(n, torch.as_tensor(budget, device=n.device))
        places = places - (self.extra_token & (places < n) & (places > 0)).long()  # one place for the extra token
        return places, torch.zeros_like(places)

    def _samples(self, top: Tensor, candidates: Tensor, positions: Tensor, samples: Tensor) -> Tensor:
        """(B, N) bool: PruMerge+'s spatially uniform samples (none for PruMerge)."""
        return torch.zeros_like(top)

    # -- the stage -----------------------------------------------------------------------------------------------
    def vision_output(self, state: TokenState) -> TokenState:
        attn, keys, feats, project = self._signals(state)
        candidates = state.visual & state.valid
        budget = state.row_budget(self.budget)
        outliers, samples = self._counts(attn, candidates, budget)
        rank = row_rank(attn, candidates, descending=True)
        top = candidates & (rank < outliers[:, None])
        sampled = self._samples(top, candidates, state.positions, samples) & ~top
        kept = top | sampled
        pruned = candidates & ~kept
        extra = pruned.any(-1) & self.extra_token  # (B,)
        if budget is not None:  # no place at all (a view's zero share of a small budget): no extra token
            extra = extra & (torch.as_tensor(budget, device=extra.device) > 0)
        # The extra token lives in the slot of the last pruned patch (any pruned slot would do).
        host = extra[:, None] & (row_rank(state.positions, pruned, descending=True) == 0) & pruned
        index = compact_index(kept | host)

        x = state.hidden if feats is None else feats
        merged = absorb(x, attn, keys, index, candidates, self.k_neighbors, self.merge)
        rest = pool_pruned(x, attn, pruned, self.merge)
        is_host = torch.gather(host, 1, index.clamp(min=0)) & (index >= 0)
        hidden = torch.where(is_host[..., None], rest[:, None, :], merged).to(x.dtype)
        if project is not None:
            hidden = project(hidden)
        positions = self._positions(state.positions, candidates, top, sampled, rank, host)
        sizes = torch.where(host, (state.sizes * pruned).sum(-1, keepdim=True), state.sizes)
        return state.replace(positions=positions, sizes=sizes).keep(index, hidden=hidden.to(state.hidden.dtype))

    def _positions(
        self, positions: Tensor, candidates: Tensor, top: Tensor, sampled: Tensor, rank: Tensor, host: Tensor
    ) -> Tensor:
        """Image slot of each output token: its own ("raster") or its place in the official sequence, which fills
        the image's first slots (from position 0, or -1 = the CLS slot under the 'full' strategy)."""
        if self.order == "raster":
            return positions
        first = torch.where(candidates, positions, positions.max() + 1).amin(-1, keepdim=True)
        n_top = top.sum(-1, keepdim=True)
        sample_rank = row_rank(positions, sampled, descending=False)
        out = torch.where(top, rank, positions - first)
        out = torch.where(sampled, n_top + sample_rank, out)
        return first + torch.where(host, n_top + sampled.sum(-1, keepdim=True), out)

    def _signals(self, state: TokenState) -> tuple[Tensor, Tensor, Tensor | None, object]:
        """CLS attention (B, N) and keys (B, N, D) on this state's slots; CLIP features and projector if offered."""
        probe = state.extras.get("vision_attention")
        if probe is None:
            raise RuntimeError(f"{self.name}: the runtime offers no attention of the vision layer after the features")
        # The features (CLS first, left-padded) and this state (the same tokens, CLS dropped or kept as image
        # token 0 under 'full') are right-aligned: state slot j is feature slot j + offset.
        cls_slot = state.num_tokens - state.valid.sum(-1)
        width = state.extras["vision_hidden"].shape[1]
        offset = width - state.num_tokens
        if offset not in (0, 1):
            raise RuntimeError(f"{self.name}: vision features and image tokens are not aligned (offset {offset})")
        valid = torch.zeros(state.batch_size, width, dtype=torch.bool, device=state.valid.device)
        valid[:, offset:] = state.valid
        valid.scatter_(1, cls_slot[:, None], True)
        attn = cls_attention(probe, cls_slot, valid)[:, offset:]
        keys = _probe_keys(probe)[:, offset:]
        return attn, keys, state.extras["vision_hidden"][:, offset:], state.extras["projector"]

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, k_neighbors={self.k_neighbors}, merge={self.merge!r}, "
            f"extra_token={self.extra_token}, order={self.order!r}"
        )


@register
class PruMergePlus(PruMerge):
    """PruMerge plus spatially uniform samples (paper Sec. 3.4), about 25% of the tokens on LLaVA-1.5.

    Args (beyond PruMerge's):
        outlier_share: budget mode only: fraction of the non-extra places filled by the top CLS attention, the
            rest by evenly spread samples (default 0.25, the official code's proportion), in [0, 1].
    """

    name = "prumerge-plus"

    def __init__(
        self,
        budget: int | None = None,
        k_neighbors: int = 32,
        merge: str = "average",
        extra_token: bool = True,
        order: str = "official",
        outlier_share: float = 0.25,
    ) -> None:
        super().__init__(budget, k_neighbors, merge, extra_token, order)
        real = isinstance(outlier_share, (int, float)) and not isinstance(outlier_share, bool)
        if not real or not 0 <= outlier_share <= 1:
            raise ValueError(f"{self.name}: outlier_share must be a number in [0, 1], got {outlier_share!r}")
        self.outlier_share = float(outlier_share)

    def _counts(self, attn: Tensor, candidates: Tensor, budget: int | Tensor | None) -> tuple[Tensor, Tensor]:
        places, samples = super()._counts(attn, candidates, budget)
        if self.budget is None:
            return places, samples  # adaptive: the samples follow from the stride rule
        top = torch.floor(places.double() * self.outlier_share + 0.5).long()
        return top, places - top

    def _samples(self, top: Tensor, candidates: Tensor, positions: Tensor, samples: Tensor) -> Tensor:
        if self.budget is not None:
            return spread(candidates & ~top, positions, samples)
        # Official: every s-th patch index below N - 1, s = floor(floor(1 / r) / 3), r = outliers / N; with
        # integers floor(1 / r) = N // outliers (equal in floating point too for N = 576 and 64). At least 1.
        patches = candidates & (positions >= 0)  # never the CLS image token of the 'full' strategy
        n = patches.sum(-1, keepdim=True)
        outliers = top.sum(-1, keepdim=True).clamp_min(1)
        stride = (n // outliers // SAMPLE_STRIDE_DIVISOR).clamp_min(1)
        return patches & (positions % stride == 0) & (positions < n - 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier_share={self.outlier_share}"


def _probe_keys(probe) -> Tensor:
    """(B, W, D) keys of the probed layer, heads concatenated as `k_proj` outputs them."""
    keys = probe.keys()
    bsz, heads, width, dim = keys.shape
    return keys.transpose(1, 2).reshape(bsz, width, heads * dim)
