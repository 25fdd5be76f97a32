"""SparseVLM: text raters, rater-guided top-k, DPC-kNN recycling, schedules, end to end on the tiny model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import generate_new_tokens, llava15_info, make_inputs, setup_pruner, slice_inputs

import pruners
import pruners.methods.sparsevlm  # noqa: F401  (registers "sparsevlm")
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.sparsevlm import (
    PAPER_SCHEDULES,
    above_mean,
    cluster_means,
    dpc_knn,
    official_counts,
    recycle_counts,
    split_target,
    text_relevance,
    text_slots,
)

NEW_TOKENS = 4


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def info(visual_tokens: int = 576, grid: tuple[int, int] = (24, 24), **changes) -> ModelInfo:
    return llava15_info(visual_tokens=visual_tokens, grid=grid, **changes)


built = functools.partial(setup_pruner, "sparsevlm")


def llm_state(
    visual: int,
    text: int,
    pad: int = 0,
    layer: int = 15,
    dim: int = 4,
    attn: torch.Tensor | None = None,
    embeds: torch.Tensor | None = None,
) -> tuple[TokenState, list]:
    """One sample: `pad` padding slots, 2 system tokens, `visual` visual tokens, `text` text tokens. The probe
    returns rows of `attn` (N, N); `embeds` (N, D) is offered as the input embeddings."""
    n = pad + 2 + visual + text
    slots = torch.arange(n)
    valid = slots >= pad
    is_visual = (slots >= pad + 2) & (slots < pad + 2 + visual)
    calls = []

    def probe(query_index, heads="mean", logits=False):
        calls.append(query_index.tolist())
        return attn[query_index]

    state = TokenState(
        hidden=torch.randn(1, n, dim),
        valid=valid[None],
        visual=is_visual[None],
        positions=torch.where(valid, slots - pad, 0)[None],
        origin=torch.where(valid, slots, -1)[None],
        sizes=torch.ones(1, n),
        stage=Stage.LLM_LAYER,
        layer=layer,
        grid=(24, 24),
        num_images=torch.ones(1, dtype=torch.long),
        probe=probe,
        extras={} if embeds is None else {"input_embeds": embeds[None]},
    )
    return state, calls


def rater_embeddings(visual: int, text: int, raters: list[int], dim: int = 4) -> torch.Tensor:
    """(2 + visual + text, dim) embeddings whose raters are the text tokens `raters`: every visual token is e0;
    those text tokens are 2 e0 (logit 2), the others e1 (logit 0)."""
    e = torch.zeros(2 + visual + text, dim)
    e[:2, 3] = 1.0
    e[2 : 2 + visual, 0] = 1.0
    e[2 + visual :, 1] = 1.0
    for t in raters:
        e[2 + visual + t] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    return e


# ---------------------------------------------------------------- step 1: text raters


def test_relevance_is_the_mean_over_visual_rows_of_the_softmax_over_text():
    state, _ = llm_state(visual=6, text=5, dim=8)
    e = state.hidden[0]
    vis, txt = e[2:8], e[8:]
    expected = torch.stack([torch.softmax(vis[v] @ txt.T, -1) for v in range(6)]).mean(0)
    rho = text_relevance(state.hidden, state.visual & state.valid, text_slots(state))
    assert torch.allclose(rho[0, 8:], expected, atol=1e-6) and (rho[0, :8] == 0).all()


def test_raters_are_exactly_the_above_mean_text_tokens():
    # Text logits 2, 2, 0, -1, 0 against every visual e0: softmax .431 .431 .058 .021 .058, mean .2.
    e = torch.zeros(2 + 4 + 5, 4)
    e[2:6, 0] = 1.0
    e[6:, 0] = torch.tensor([2.0, 2.0, 0.0, -1.0, 0.0])
    e[:2, 0] = 10.0  # system tokens are neither visual nor text: never raters, never counted
    for pad in (0, 3):
        state, _ = llm_state(visual=4, text=5, pad=pad, embeds=torch.cat([torch.randn(pad, 4), e]))
        embeds = state.extras["input_embeds"]
        text = text_slots(state)
        assert text[0].nonzero()[:, 0].tolist() == [pad + 6 + t for t in range(5)]
        raters = above_mean(text_relevance(embeds, state.visual & state.valid, text), text)
        assert raters[0].nonzero()[:, 0].tolist() == [pad + 6, pad + 7]


def test_all_text_rates_when_no_token_is_above_the_mean():
    relevance = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    text = torch.tensor([[False, True, True, False]])
    assert above_mean(relevance, text).tolist() == text.tolist()


def test_raters_come_from_the_input_embeddings_and_are_kept_across_layers():
    # Attention at layer 15: rows 8 and 10 (the raters) favour visual token 5, the other rows token 0.
    attn = torch.zeros(12, 12)
    attn[:, 2] = 1.0
    attn[[8, 10], 2] = 0.0
    attn[[8, 10], 7] = 1.0
    embeds = rater_embeddings(6, 4, raters=[0, 2])
    pruner = built(info(), budget=1, recycle=False)
    assert pruner.llm_layers == (2, 6, 15)
    first, _ = llm_state(6, 4, layer=2, attn=attn, embeds=embeds)
    pruner.llm_layer(first)  # the raters are chosen at the first pruning layer
    later, calls = llm_state(6, 4, layer=15, attn=attn, embeds=torch.randn(12, 4))  # later embeddings: unused
    out = pruner.llm_layer(later)
    assert calls == [[[8, 10]]]
    assert out.origin[0][out.visual[0] & out.valid[0]].tolist() == [7]


def test_raters_need_the_input_embeddings():
    pruner = built(info(), budget=1, recycle=False)
    state, _ = llm_state(6, 4, layer=2)
    with pytest.raises(RuntimeError, match="input_embeds"):
        pruner.llm_layer(state)


# ---------------------------------------------------------------- step 2: rater-guided top-k


def scored_state(pad: int = 0) -> tuple[TokenState, list, torch.Tensor]:
    """6 visual tokens (slots 2..7) and 4 text tokens (8..11) after `pad` slots; raters = text 0 and 2.
    Rater rows give visual j0..j5 the mean attention .05 .30 .10 .25 .20 .10; non-rater rows the reverse."""
    rater_rows = torch.tensor([[0.0, 0.3, 0.1, 0.3, 0.2, 0.1], [0.1, 0.3, 0.1, 0.2, 0.2, 0.1]])
    n = pad + 12
    attn = torch.zeros(n, n)
    attn[:, pad + 2 : pad + 8] = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.1, 0.2])
    attn[[pad + 8, pad + 10], pad + 2 : pad + 8] = rater_rows
    embeds = torch.cat([torch.randn(pad, 4), rater_embeddings(6, 4, raters=[0, 2])])
    state, calls = llm_state(6, 4, pad=pad, attn=attn, embeds=embeds)
    return state, calls, rater_rows.mean(0)


def kept_visual(state: TokenState) -> list[int]:
    """Origins of the surviving visual tokens, as column numbers j (origin - 2 - padding)."""
    first = int(state.origin[0][state.valid[0]][0])
    return (state.origin[0][state.visual[0] & state.valid[0]] - first - 2).tolist()


@pytest.mark.parametrize("pad", [0, 2])
def test_kept_set_is_the_top_of_the_raters_mean_attention(pad):
    state, calls, mean = scored_state(pad)
    out = built(info(), budget=3, recycle=False).llm_layer(state)
    assert calls == [[[pad + 8, pad + 10]]]  # only the rater rows are queried
    assert kept_visual(out) == sorted(mean.topk(3).indices.tolist()) == [1, 3, 4]
    assert out.num_tokens == 2 + 3 + 4 and (out.origin[0, :2] == torch.tensor([pad, pad + 1])).all()


def test_recycled_token_is_the_mean_of_the_best_dropped_and_follows_the_kept_ones():
    # Budget 3 of 6: keep 2 (j1, j3), drop 4; floor(.3 * 4) + 1 = 2 candidates (j4, then j2 by slot on the .10
    # tie), floor(2 / 10) + 1 = 1 cluster: 2 + 1 = 3 tokens.
    state, _, _ = scored_state()
    out = built(info(), budget=3).llm_layer(state)
    assert out.origin[0].tolist() == [0, 1, 3, 5, 6, 8, 9, 10, 11]  # kept j1 j3, recycled (centre j4), text
    assert out.visual[0].tolist() == [False, False, True, True, True] + [False] * 4
    assert torch.allclose(out.hidden[0, 4], state.hidden[0, [6, 4]].mean(0), atol=1e-6)
    assert out.sizes[0, 4] == 2 and torch.equal(out.hidden[0, 2:4], state.hidden[0, [3, 5]])
    assert out.positions[0].tolist() == [0, 1, 3, 5, 6, 8, 9, 10, 11]  # ids as cut (the runtime renumbers them)


def test_paper_schedule_keeps_at_most_all_but_one_as_official():
    state, _, _ = scored_state()
    pruner = built(info(), budget=64, schedule="paper")  # layer 15 keeps 17 > 6: official keeps 6 - 1
    out = pruner.llm_layer(state)
    # j0 (.05) is dropped and recycled as itself (a cluster of one), after the kept j1..j5.
    assert out.origin[0, 2:8].tolist() == [3, 4, 5, 6, 7, 2] and out.visual[0, 2:8].all()
    assert torch.equal(out.hidden[0, 7], state.hidden[0, 2])


# ---------------------------------------------------------------- step 3: recycling (DPC-kNN)


def blobs(sizes: list[int], dim: int = 6, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of well-separated blobs (centres 10 apart on different axes) in shuffled order, and their blob ids."""
    centres = 10.0 * torch.eye(dim)[: len(sizes)]
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    points = centres[labels] + spread * torch.randn(len(labels), dim)
    perm = torch.randperm(len(labels))
    return points[perm], labels[perm]


def test_recycled_tokens_are_the_means_of_their_dpc_knn_clusters():
    points, labels = blobs([12, 8, 5])
    assign, centre = dpc_knn(points[None], torch.ones(1, 25, dtype=torch.bool), torch.tensor([3]))
    assert (centre >= 0).all() and assign.min() >= 0
    # Each cluster is exactly one blob, and its centre lies in it.
    for c in range(3):
        members = assign[0] == c
        assert labels[members].unique().numel() == 1 and labels[centre[0, c]] == labels[members][0]
    means, counts = cluster_means(points[None], assign, 3)
    for c in range(3):
        assert torch.allclose(means[0, c], points[assign[0] == c].mean(0), atol=1e-6)
    assert sorted(counts[0].tolist()) == [5, 8, 12]


def test_dpc_knn_follows_density_and_distance_to_denser_points():
    # k = 2 nearest (self included): densities exp(-.005), exp(-.00125) x2 (tie: the earlier, 1, is denser),
    # exp(-.045) x2. delta: 1 -> the largest distance 5.3, 3 -> 4.85 (to 2); the rest are near a denser point.
    points = torch.tensor([[0.0], [0.1], [0.15], [5.0], [5.3]])
    assign, centre = dpc_knn(points[None], torch.ones(1, 5, dtype=torch.bool), torch.tensor([2]))
    assert centre[0].tolist() == [1, 3]
    assert assign[0].tolist() == [0, 0, 0, 1, 1]


def test_dpc_knn_batched_rows_equal_each_row_alone():
    a, _ = blobs([6, 4, 3])
    b, _ = blobs([5, 5])
    x = torch.zeros(2, 13, 6)
    x[0], x[1, :10] = a, b
    valid = torch.arange(13) < torch.tensor([[13], [10]])
    assign, centre = dpc_knn(x, valid, torch.tensor([3, 2]))
    alone_a = dpc_knn(a[None], torch.ones(1, 13, dtype=torch.bool), torch.tensor([3]))
    alone_b = dpc_knn(b[None], torch.ones(1, 10, dtype=torch.bool), torch.tensor([2]))
    assert torch.equal(assign[0], alone_a[0][0]) and torch.equal(centre[0], alone_a[1][0])
    assert torch.equal(assign[1, :10], alone_b[0][0]) and (assign[1, 10:] == -1).all()
    assert torch.equal(centre[1, :2], alone_b[1][0]) and centre[1, 2] == -1


def test_recycle_counts_follow_the_official_rule():
    cand, clusters = recycle_counts(torch.tensor([0, 1, 4, 9, 510, 52, 15]))
    assert cand.tolist() == [0, 1, 2, 3, 154, 16, 5]
    assert clusters.tolist() == [0, 1, 1, 1, 16, 2, 1]
    assert official_counts(PAPER_SCHEDULES[64]) == [82, 32, 18]
    assert official_counts(PAPER_SCHEDULES[192]) == [309, 204, 113]


def test_split_target_meets_every_target_exactly():
    present = torch.arange(1, 121).repeat_interleave(120)
    target = torch.arange(1, 121).repeat(120)
    keep = target <= present
    present, target = present[keep], target[keep]
    kept, clusters = split_target(present, target, 0.3, 10)
    assert torch.equal(kept + clusters, target)
    dropped = present - kept
    rule = recycle_counts(dropped)[1]
    feasible = recycle_counts(present)[1] <= target  # even k = 0 fits: the paper's cluster rule holds
    assert torch.equal(clusters[feasible], rule[feasible]) and (clusters[~feasible] < rule[~feasible]).all()
    assert torch.equal(kept[present == target], present[present == target])  # nothing to drop: no recycling


# ---------------------------------------------------------------- schedules and arguments


def test_budget_schedule_follows_the_paper_shape_and_ends_at_the_budget():
    assert built(info(), budget=64).stage_counts == (167, 92, 64)
    assert built(info(), budget=128).stage_counts == (409, 236, 128)
    assert built(info(), budget=192).stage_counts == (378, 286, 192)
    assert built(info(), budget=576).stage_counts == (576, 576, 576)
    assert built(info()).budget == 192
    assert built(info(), budget=64, schedule="paper").stage_counts == PAPER_SCHEDULES[64]
    assert built(info(64, (8, 8), llm_layers=4), budget=64, schedule="paper").stage_counts == (7, 3, 2)


def test_layer_schedules_scale_with_depth():
    assert built(info()).prune_at == (2, 6, 15)
    tiny = built(info(64, (8, 8), llm_layers=4), budget=32)
    assert tiny.prune_at == (0, 1, 2) and tiny.llm_layers == (0, 1, 2) and tiny.stage_counts == (49, 41, 32)
    shallow = built(info(llm_layers=3), budget=64)
    assert shallow.prune_at == (0, 1) and shallow.stage_counts == (167, 64)  # stages 2 and 3 merge on layer 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "linear"}, r"schedule must be one of \('budget', 'paper'\), got 'linear'"),
        ({"schedule": "paper", "budget": 100}, r"no row for budget 100; allowed: 64, 96, 128, 192"),
        ({"prune_layers": (2, 6)}, r"prune_layers must be 3 increasing layer indices >= 0, got \(2, 6\)"),
        ({"prune_layers": (6, 2, 15)}, r"prune_layers must be 3 increasing"),
        ({"prune_layers": (2, -1, 15)}, r"prune_layers entry must be an int >= 0, got -1"),
        ({"recycle": 1}, r"recycle must be True or False, got 1"),
        ({"recycle_ratio": 0}, r"recycle_ratio must be a number in \(0, 1\], got 0"),
        ({"tokens_per_cluster": 0}, r"tokens_per_cluster must be an int >= 1, got 0"),
        ({"positions": "kept"}, r"positions must be one of \('contiguous', 'original'\), got 'kept'"),
        ({"budget": 0}, r"budget must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("sparsevlm", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match=r"budget 577 is out of range.*allowed 1..576"):
        built(info(), budget=577)
    with pytest.raises(ValueError, match=r"decoder has 1 layer\(s\); allowed: at least 2"):
        built(info(llm_layers=1))


# ---------------------------------------------------------------- end to end on the tiny model


generate = functools.partial(generate_new_tokens, new_tokens=NEW_TOKENS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": 32},
        {"budget": 3},
        {"budget": 64, "schedule": "paper"},
        {"budget": 16, "positions": "original"},
        {"budget": 16, "recycle": False},
    ],
)
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, pruners.build("sparsevlm", **kwargs))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("sparsevlm", **kwargs))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


@pytest.mark.parametrize("budget", [1, 2, 7, 32, 63])
def test_budget_is_met_exactly(tiny_llava, budget):
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build("sparsevlm", budget=budget), True)
    assert stats["visual_tokens"] == budget
    per_layer = stats["visual_tokens_per_layer"]
    assert per_layer[0] == 64 and all(a >= b for a, b in zip(per_layer, per_layer[1:]))


def test_paper_schedule_reproduces_the_official_counts(tiny_llava):
    pruner = pruners.build("sparsevlm", budget=64, schedule="paper")
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruner, True)
    assert stats["visual_tokens_per_layer"] == [64.0, *official_counts((7, 3, 2), visual=64)]
    assert stats["visual_tokens_layer_mean"] == (64 + 9 + 4 + 3) / 4


def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    assert torch.equal(
        generate(tiny_llava, inputs, pruners.build("sparsevlm", budget=64)), generate(tiny_llava, inputs)
    )


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_position_policy(tiny_llava, positions):
    inputs = slice_inputs(make_inputs(tiny_llava, [5]), 0)
    pruner = pruners.build("sparsevlm", budget=8, positions=positions)
    seen = {}
    hook = pruner.llm_layer

    def spy(state):
        seen.setdefault(state.layer, state)
        return hook(state)

    pruner.llm_layer = spy
    with torch.no_grad(), pruners.attach(tiny_llava, pruner):
        tiny_llava(**inputs)
    after = seen[1]  # the state handed to layer 1's hook: after the layer-0 cut
    valid = after.valid[0]
    assert after.visual[0][valid].sum() == pruner.stage_counts[0]
    if positions == "contiguous":
        assert after.positions[0][valid].tolist() == list(range(int(valid.sum())))
    else:  # every token, a recycled one too (its centre's), keeps its input id: here its origin
        assert torch.equal(after.positions[0][valid], after.origin[0][valid])
