"""Known-answer tests for the shared steps in `pruners/ops.py`."""

from __future__ import annotations

import pytest
import torch

from pruners.base import Stage, TokenState
from pruners.ops import (
    attention_rows,
    bipartite_soft_matching,
    compact_index,
    cosine_similarity,
    merge_weighted,
    topk_visual,
)


def llm_state(visual: list[list[int]], valid: list[list[int]] | None = None) -> TokenState:
    vis = torch.tensor(visual, dtype=torch.bool)
    ok = torch.ones_like(vis) if valid is None else torch.tensor(valid, dtype=torch.bool)
    slots = torch.arange(vis.shape[1]).expand_as(vis)
    return TokenState(hidden=torch.zeros(*vis.shape, 2), valid=ok, visual=vis & ok, positions=slots,
                      origin=slots, sizes=torch.ones(vis.shape), stage=Stage.LLM_LAYER)


def test_compact_index_orders_and_left_pads():
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert compact_index(keep).tolist() == [[0, 2], [-1, 3]]
    assert compact_index(torch.zeros(2, 3, dtype=torch.bool)).shape == (2, 0)


def test_topk_visual_keeps_text_best_visual_and_earlier_on_ties():
    state = llm_state([[0, 1, 1, 1, 1, 0]])
    scores = torch.tensor([[9.0, 0.5, 0.7, 0.7, 0.1, 9.0]])
    # 0.7 beats 0.5; with k=1 the tie between slots 2 and 3 goes to the earlier slot.
    assert topk_visual(state, scores, 2).tolist() == [[0, 2, 3, 5]]
    assert topk_visual(state, scores, 1).tolist() == [[0, 2, 5]]
    assert topk_visual(state, torch.zeros(1, 6), 2).tolist() == [[0, 1, 2, 5]]


def test_topk_visual_per_sample_counts_padding_and_clamp():
    state = llm_state([[0, 0, 1, 1, 0], [1, 1, 1, 1, 0]], valid=[[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    scores = torch.tensor([[5.0, 0.0, 0.2, 0.3, 0.0], [0.1, 0.4, 0.3, 0.2, 0.0]])
    # Sample 0 has 2 visual tokens, asked for 9: clamp to 2. Sample 1 keeps its best 2.
    index = topk_visual(state, scores, torch.tensor([9, 2]))
    assert index.tolist() == [[1, 2, 3, 4], [-1, 1, 2, 4]]  # width = the most kept


def test_topk_visual_counts_candidates_with_minus_inf_scores():
    # A -inf visual score must not lose its place to a text token that is not a candidate.
    state = llm_state([[0, 1, 1]])
    assert topk_visual(state, torch.tensor([[0.0, float("-inf"), float("nan")]]), 2).tolist() == [[0, 1, 2]]


def test_cosine_similarity():
    a = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    b = torch.tensor([[[2.0, 0.0]]])
    assert torch.allclose(cosine_similarity(a, b), torch.tensor([[[1.0], [0.6]]]))


def test_merge_weighted_is_size_weighted_mean():
    hidden = torch.tensor([[[1.0], [2.0], [10.0], [4.0]]])
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0]])
    # Slots 0 and 3 both merge into slot 2.
    merged, new_sizes = merge_weighted(hidden, sizes, torch.tensor([[0, 3]]), torch.tensor([[2, 2]]))
    assert torch.allclose(merged[0, 2], torch.tensor([(1 * 1 + 3 * 10 + 1 * 4) / 5.0]))
    assert new_sizes.tolist() == [[1.0, 2.0, 5.0, 1.0]]
    assert merged[0, 1].item() == 2.0 and merged[0, 0].item() == 1.0  # untouched / sources keep values
    merged, new_sizes = merge_weighted(hidden, sizes, torch.tensor([[0]]), torch.tensor([[1]]),
                                       weights=torch.tensor([[0.5]]))
    assert torch.allclose(merged[0, 1], torch.tensor([(0.5 * 1 + 2 * 2) / 2.5]))
    assert new_sizes[0, 1].item() == 2.5


def test_bipartite_soft_matching_known_pairs_and_protection():
    # Slot 0 is protected. Candidates 1..6 split into A = slots 1, 3, 5 and B = slots 2, 4, 6.
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[0] + 0.1 * e[3], e[2], e[2], e[3], e[1] + e[3]])[None]
    cand = torch.tensor([[False] + [True] * 6])
    src, dst, score = bipartite_soft_matching(metric, 2, cand)
    # Slot 3 matches slot 4 exactly (cos 1); slot 1 goes to slot 6 (cos 0.71). Slot 0 matches
    # slot 2 best of all but is not a candidate.
    assert src.tolist() == [[3, 1]] and dst.tolist() == [[4, 6]]
    assert score[0, 0].item() == pytest.approx(1.0) and score[0, 1].item() == pytest.approx(2 ** -0.5)


def test_bipartite_soft_matching_caps_and_edge_cases():
    metric = torch.randn(2, 5, 3)
    cand = torch.ones(2, 5, dtype=torch.bool)
    src, dst, _ = bipartite_soft_matching(metric, 10, cand)
    assert src.shape == (2, 2)  # at most |B| = 5 // 2
    src, dst, score = bipartite_soft_matching(metric, 1, torch.tensor([[True] + [False] * 4] * 2))
    assert src.shape == dst.shape == score.shape == (2, 0)
    with pytest.raises(ValueError, match="same number of candidates"):
        bipartite_soft_matching(metric, 1, torch.tensor([[True] * 5, [True] * 4 + [False]]))


def test_attention_rows_matches_manual_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)  # grouped-query: 2 KV heads for 4 query heads
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5).clone()
    mask[1, :, 0] = False  # sample 1 has a padding slot
    rows = torch.tensor([[4, 2], [4, 3]])
    k_full = k.repeat_interleave(2, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k_full) * 0.3
    probs = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    want = torch.stack([probs[b, :, rows[b]] for b in range(2)])  # (B, H, R, N)
    got = attention_rows(q, k, rows, 0.3, mask, heads="none")
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(attention_rows(q, k, rows, 0.3, mask), want.mean(1), atol=1e-6)
    assert torch.allclose(attention_rows(q, k, rows, 0.3, mask, heads="max"), want.amax(1), atol=1e-6)
    want_logits = torch.stack([logits[b, :, rows[b]] for b in range(2)]).mean(1)
    assert torch.allclose(attention_rows(q, k, rows, 0.3, mask, logits=True), want_logits, atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        attention_rows(q, k, rows, 0.3, mask, heads="sum")
