"""Shared steps of token reduction, in the filter -> correlate -> compress vocabulary.

filter:    `compact_index`, `row_rank`, `top_mask`, `topk_visual` (score tokens, choose what stays)
correlate: `cosine_similarity`, `bipartite_soft_matching` (match dropped tokens to kept ones)
compress:  `merge_weighted` (size-weighted merge of sources into destinations)
probes:    `attention_rows` (head-reduced attention rows from queries and keys)

All functions work on padded batches: (B, N, ...) tensors with a (B, N) `valid` mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenState


def compact_index(keep: Tensor) -> Tensor:
    """Slots where `keep` (B, N) is True, ascending, left-padded with -1 to (B, max kept)."""
    counts = keep.sum(-1)
    width = int(counts.max()) if keep.numel() else 0
    n = keep.shape[1]
    slots = torch.arange(n, device=keep.device).expand_as(keep)
    # Sort key puts dropped slots first (they become the left padding) and kept slots in order.
    key = torch.where(keep, slots + n, slots)
    order = key.sort(-1).values[:, n - width :] if width else key[:, :0]
    index = torch.where(order >= n, order - n, torch.full_like(order, -1))
    return index


def row_rank(key: Tensor, mask: Tensor | None = None, descending: bool = True) -> Tensor:
    """(B, N) rank of each slot in a stable sort of its row by `key` (0 = first; ties: the earlier slot
    first). Slots outside `mask` rank after every slot inside it."""
    key = key.double()  # exact for float32 scores and integer positions alike
    if mask is not None:
        key = key.masked_fill(~mask, float("-inf") if descending else float("inf"))
    order = key.sort(dim=-1, descending=descending, stable=True).indices
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def top_mask(scores: Tensor, candidates: Tensor, k: int | Tensor) -> Tensor:
    """(B, N) bool: the `k` (int or (B,)) highest-scoring `candidates` of each row, all of them if fewer.

    Ties go to the earlier slot (deterministic across batch sizes); a candidate scored NaN or -inf
    still ranks above every non-candidate, so a row always gets min(k, candidates).
    """
    low = torch.finfo(torch.float64).min
    k = torch.as_tensor(k, device=scores.device).expand(scores.shape[0])
    return candidates & (row_rank(scores.double().nan_to_num(nan=low, neginf=low), candidates) < k[:, None])


def topk_visual(state: TokenState, scores: Tensor, k: int | Tensor) -> Tensor:
    """Index (B, K) keeping every valid non-visual token and the `k` best-scoring visual tokens.

    `scores` (B, N) is read on visual slots only; `k` is an int or (B,) per-sample count. Order is
    preserved; ties go to the earlier slot (see `top_mask`).
    """
    chosen = top_mask(scores, state.visual & state.valid, k)
    return compact_index((state.valid & ~state.visual) | chosen)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, M) cosine similarity between rows of a (B, N, D) and b (B, M, D)."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return a @ b.transpose(-1, -2)


def bipartite_soft_matching(metric: Tensor, r: int, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching (Bolya et al., ICLR'23, Sec. 3).

    Candidate slots are split alternately into sets A (even rank) and B (odd rank). Each A
    token is linked to its most similar B token by cosine of `metric`; the `r` A tokens with
    the strongest links are merged into their B partners.

    Args:
        metric: (B, N, C) similarity features (ToMe: keys averaged over heads).
        r: tokens to merge away per sample.
        candidates: (B, N) bool, slots that may take part (protected tokens and padding excluded).
            Every sample must have the same number of candidates.

    Returns:
        src (B, r) slots merged away, dst (B, r) their destination slots, and score (B, r).
    """
    bsz, n, _ = metric.shape
    cand_idx = compact_index(candidates)
    if (cand_idx < 0).any():
        raise ValueError("bipartite_soft_matching needs the same number of candidates in every sample")
    a_idx, b_idx = cand_idx[:, ::2], cand_idx[:, 1::2]
    # At most |B| = half the candidates (ToMe's 50% cap); with no B token there is nothing to match.
    r = min(r, b_idx.shape[1])
    if r <= 0:
        empty = cand_idx[:, :0]
        return empty, empty, metric.new_zeros(bsz, 0, dtype=torch.float32)
    gather = lambda idx: torch.gather(metric, 1, idx[..., None].expand(-1, -1, metric.shape[-1]))  # noqa: E731
    sim = cosine_similarity(gather(a_idx), gather(b_idx))
    best, best_b = sim.max(-1)
    order = best.sort(dim=-1, descending=True, stable=True).indices[:, :r]
    src = torch.gather(a_idx, 1, order)
    dst = torch.gather(b_idx, 1, torch.gather(best_b, 1, order))
    return src, dst, torch.gather(best, 1, order)


def merge_weighted(
    hidden: Tensor, sizes: Tensor, src: Tensor, dst: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Merge tokens `src` (B, r) into `dst` (B, r) by a size-weighted average.

    Each destination becomes (s_d x_d + sum_i w_i s_i x_i) / (s_d + sum_i w_i s_i), where s
    are the token sizes and w optional per-source weights (default 1). Sizes add up the same
    way. Sources keep their values; the caller drops them.
    """
    sizes = sizes.float()
    src_w = torch.gather(sizes, 1, src)
    if weights is not None:
        src_w = src_w * weights.float()
    width = hidden.shape[-1]
    src_x = torch.gather(hidden.float(), 1, src[..., None].expand(-1, -1, width))
    total = (hidden.float() * sizes[..., None]).scatter_add(
        1, dst[..., None].expand(-1, -1, width), src_x * src_w[..., None]
    )
    new_sizes = sizes.scatter_add(1, dst, src_w)
    merged = total / new_sizes.clamp_min(1e-6)[..., None]
    return merged.to(hidden.dtype), new_sizes


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_index: Tensor,
    scale: float,
    mask: Tensor | None,
    heads: str = "mean",
    logits: bool = False,
) -> Tensor:
    """Attention of chosen query rows, from per-head queries and keys.

    Args:
        query: (B, H, N, hd); key: (B, Hkv, N, hd) (grouped-query keys are repeated).
        query_index: (B, R) slots of the rows wanted.
        mask: (B, N, N) bool, True where a query may attend a key (None: all).
        heads: "mean", "max" or "none".
        logits: return scaled logits before mask and softmax.
    """
    bsz, n_heads, _, hd = query.shape
    if key.shape[1] != n_heads:
        key = key.repeat_interleave(n_heads // key.shape[1], dim=1)
    idx = query_index[:, None, :, None].expand(-1, n_heads, -1, hd)
    q = torch.gather(query, 2, idx).float()
    scores = (q @ key.float().transpose(-1, -2)) * scale  # (B, H, R, N)
    if not logits:
        if mask is not None:
            rows = torch.gather(mask, 1, query_index[..., None].expand(-1, -1, mask.shape[-1]))
            scores = scores.masked_fill(~rows[:, None], float("-inf"))
        scores = scores.softmax(-1)
    return reduce_heads(scores, heads)


def reduce_heads(scores: Tensor, heads: str) -> Tensor:
    """(B, H, ...) per-head attention reduced over heads: "mean", "max", or "none" (kept)."""
    if heads == "mean":
        return scores.mean(1)
    if heads == "max":
        return scores.amax(1)
    if heads == "none":
        return scores
    raise ValueError(f"heads must be 'mean', 'max' or 'none', got {heads!r}")
