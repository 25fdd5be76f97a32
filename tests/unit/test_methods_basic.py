"""Known-answer tests for the first pruners: none, random, pool, fastv, tome, and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import llava15_info, setup_pruner

import pruners
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.pool import choose_grid
from pruners.methods.tome import merge_schedule, min_reachable


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def info(visual_tokens: int = 576, grid: tuple[int, int] = (24, 24), vision_feature_layer: int = 23,
         llm_layers: int = 32) -> ModelInfo:
    return llava15_info(visual_tokens=visual_tokens, grid=grid, vision_feature_layer=vision_feature_layer,
                        llm_layers=llm_layers)


built = setup_pruner


def output_state(hidden: torch.Tensor, grid: tuple[int, int]) -> TokenState:
    """VISION_OUTPUT state: (images, N, D) features, all visual, positions = patch index."""
    n_img, n, _ = hidden.shape
    patches = torch.arange(n).expand(n_img, n)
    return TokenState(hidden=hidden, valid=torch.ones(n_img, n, dtype=torch.bool),
                      visual=torch.ones(n_img, n, dtype=torch.bool), positions=patches, origin=patches,
                      sizes=torch.ones(n_img, n), stage=Stage.VISION_OUTPUT, grid=grid,
                      num_images=torch.ones(n_img, dtype=torch.long))


# ---------------------------------------------------------------- registry


def test_registry_builds_by_name_and_rejects_unknowns():
    assert {"none", "random", "pool", "fastv", "tome"} <= set(pruners.available())
    assert pruners.build("fastv", budget=64).budget == 64
    with pytest.raises(ValueError, match="unknown pruner 'nope'.*fastv.*tome"):
        pruners.build("nope")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['bogus'\].*'budget'.*'scoring'"):
        pruners.build("fastv", bogus=1)


@pytest.mark.parametrize("name, kwargs, message", [
    ("fastv", {"scoring": "max"}, "scoring must be one of"),
    ("fastv", {"k": 0}, "k must be an int >= 1"),
    ("fastv", {"ratio": 1.0}, r"ratio .* must be in \[0, 1\)"),
    ("random", {"seed": -1}, "seed must be a non-negative int"),
    ("pool", {"budget": 0}, "budget must be at least 1"),
    ("pool", {"budget": True}, "budget must be an int or None"),
    ("tome", {"budget": 64, "r": 8}, "not both"),
    ("tome", {"r": 0}, "r .* must be an int >= 1"),
])
def test_arguments_are_validated(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build(name, **kwargs)


def test_budget_out_of_model_range_is_rejected_in_setup():
    with pytest.raises(ValueError, match="budget 577 is out of range.*1..576"):
        built("fastv", info(), budget=577)


# ---------------------------------------------------------------- none


def test_none_has_no_stage_and_only_accepts_a_keep_all_budget():
    assert built("none", info()).stages == frozenset()
    built("none", info(), budget=576)
    with pytest.raises(ValueError, match="budget must be None or 576"):
        built("none", info(), budget=64)


# ---------------------------------------------------------------- random


def test_random_keeps_the_same_seeded_subset_for_every_image():
    model = info(visual_tokens=16, grid=(4, 4))
    hidden = torch.randn(3, 16, 2)
    out = built("random", model, budget=5).vision_output(output_state(hidden, (4, 4)))
    assert out.positions.shape == (3, 5)
    assert (out.positions == out.positions[0]).all()  # same patches in every image
    assert (out.positions[0].diff() > 0).all()  # patch order
    assert torch.equal(out.hidden, hidden[:, out.positions[0]])
    alone = built("random", model, budget=5).vision_output(output_state(hidden[2:], (4, 4)))
    assert torch.equal(alone.positions[0], out.positions[0])  # alone equals batched
    other = built("random", model, budget=5, seed=1).vision_output(output_state(hidden, (4, 4)))
    assert not torch.equal(other.positions[0], out.positions[0])
    assert built("random", model).budget == 4  # default: a quarter


# ---------------------------------------------------------------- pool


def test_pool_chooses_the_grid_closest_in_aspect():
    assert choose_grid(144, (24, 24)) == (12, 12)
    assert choose_grid(6, (4, 6)) == (2, 3)
    assert choose_grid(8, (24, 24)) == (4, 2)  # 2x4 and 4x2 tie: more rows
    assert choose_grid(29, (24, 24)) is None
    assert built("pool", info()).budget == 144  # default: 2x2 pooling


def test_pool_tokens_are_window_means_at_top_left_positions():
    hidden = torch.arange(2 * 24 * 3, dtype=torch.float32).view(2, 24, 3)
    out = built("pool", info(24, (4, 6)), budget=6).vision_output(output_state(hidden, (4, 6)))
    grid = hidden.view(2, 4, 6, 3)
    assert out.positions[0].tolist() == [0, 2, 4, 12, 14, 16]
    assert torch.allclose(out.hidden[:, 0], grid[:, 0:2, 0:2].mean((1, 2)))
    assert torch.allclose(out.hidden[:, 5], grid[:, 2:4, 4:6].mean((1, 2)))
    assert out.sizes.tolist() == [[4.0] * 6] * 2


def test_pool_uneven_grid_uses_overlapping_adaptive_windows():
    hidden = torch.randn(1, 25, 2)
    out = built("pool", info(25, (5, 5)), budget=4).vision_output(output_state(hidden, (5, 5)))
    grid = hidden.view(1, 5, 5, 2)
    # Adaptive windows over 5 cells into 2: [0, 3) and [2, 5).
    assert out.positions.tolist() == [[0, 2, 10, 12]]
    assert torch.allclose(out.hidden[0, 3], grid[0, 2:5, 2:5].mean((0, 1)), atol=1e-6)
    assert out.sizes.tolist() == [[9.0] * 4]


def test_pool_rejects_an_impossible_budget_and_names_the_nearest():
    with pytest.raises(ValueError, match=r"budget 29 cannot be laid out.*24x24.*nearest budgets that work: 28 or 30"):
        built("pool", info(), budget=29)


# ---------------------------------------------------------------- fastv


def fastv_state(attn: torch.Tensor) -> TokenState:
    """Two samples of 8 slots; sample 0 (one image of 3 tokens) is left-padded by 3, sample 1 has
    two images (6 visual tokens). The probe reads rows of the given (B, L, L) attention."""
    visual = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)

    def probe(query_index, heads="mean", logits=False):
        return torch.gather(attn, 1, query_index[..., None].expand(-1, -1, attn.shape[-1]))

    return TokenState(hidden=torch.randn(2, 8, 4), valid=valid, visual=visual, positions=pos,
                      origin=torch.arange(8).expand(2, 8), sizes=torch.ones(2, 8), stage=Stage.LLM_LAYER,
                      layer=1, num_images=torch.tensor([1, 2]), probe=probe)


def test_fastv_keeps_top_budget_of_last_row_and_all_text_per_sample():
    attn = torch.rand(2, 8, 8)
    attn[0, 7, 4:7] = torch.tensor([0.3, 0.1, 0.2])
    attn[1, 7, 1:7] = torch.tensor([0.6, 0.1, 0.5, 0.2, 0.3, 0.4])
    pruner = built("fastv", info(visual_tokens=3, llm_layers=4), budget=2)
    assert pruner.llm_layers == (1,)
    state = fastv_state(attn)
    out = pruner.llm_layer(state)
    # Sample 0 keeps 2 of its 3 (slots 4, 6) and its text; sample 1 keeps 2 * 2 = 4 of 6.
    assert out.origin.tolist() == [[-1, -1, 3, 4, 6, 7], [0, 1, 3, 5, 6, 7]]  # left-padded to the widest
    assert torch.equal(out.positions[1], state.positions[1, [0, 1, 3, 5, 6, 7]])  # original position ids
    assert torch.equal(out.hidden[1], state.hidden[1, [0, 1, 3, 5, 6, 7]])
    assert (out.visual & out.valid).sum(-1).tolist() == [2, 4]


def test_fastv_mean_scoring_uses_column_mean_over_other_valid_rows():
    attn = torch.zeros(2, 8, 8)
    attn[:, 7, :] = torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])  # the last row alone
    attn[0, :3] = float("nan")  # padding rows (fully masked) must not count
    attn[0, 4, 4] = attn[1, 4, 4] = 5.0  # self-attention must not count
    attn[0, 3, 6] = attn[0, 5, 6] = 1.0  # sample 0: slot 6 gets the most from other rows
    attn[1, 2:7, 5] = 0.3  # sample 1: slot 5 gets 4 * 0.3 + 0.5 from the others (own row excluded)
    attn[1, 3:7, 3] = 0.25  # slot 3: 3 * 0.25 + 0.7
    model = info(visual_tokens=3, llm_layers=4)
    last = built("fastv", model, budget=1).llm_layer(fastv_state(attn))
    mean = built("fastv", model, budget=1, scoring="mean").llm_layer(fastv_state(attn))
    assert (last.origin[0, -2].item(), last.origin[1, 1:3].tolist()) == (4, [1, 2])
    assert (mean.origin[0, -2].item(), mean.origin[1, 1:3].tolist()) == (6, [3, 5])
    scores = built("fastv", model, scoring="mean").scores(fastv_state(attn))
    assert scores[1, 5].item() == pytest.approx((0.3 * 4 + 0.5) / 7)  # mean over the 7 other rows


def test_fastv_ratio_default_and_layer_validation():
    assert built("fastv", info()).budget == 288  # R = 50% of 576
    assert built("fastv", info(), ratio=0.75).budget == 144
    assert built("fastv", info(llm_layers=2), k=1).llm_layers == (0,)
    with pytest.raises(ValueError, match=r"k=2 .* allowed 1..1"):
        built("fastv", info(llm_layers=2))


# ---------------------------------------------------------------- tome


def test_tome_schedule_spreads_merges_evenly_within_the_half_cap():
    for budget in (1, 64, 128, 192, 575):
        schedule = merge_schedule(576, budget, 23)
        assert sum(schedule) == 576 - budget
        n = 576
        for r in schedule:
            assert r <= n // 2
            n -= r
    assert merge_schedule(576, 64, 23) == [23] * 6 + [22] * 17
    # 16 tokens, budget 4 in 2 layers: even would be 6 + 6, but the second layer may merge only
    # 5 of 10, so the first layer front-loads: 8 then 4.
    assert merge_schedule(16, 4, 2) == [8, 4]
    assert min_reachable(16, 1) == 8
    with pytest.raises(ValueError, match="budget 7 is not reachable.*allowed 8..16"):
        built("tome", info(visual_tokens=16, grid=(4, 4), vision_feature_layer=1), budget=7)


def test_tome_setup_modes():
    pruner = built("tome", info(), budget=64)
    assert pruner.vision_layers == tuple(range(23)) and pruner.vision_hook_point == "attn"
    assert sum(pruner.schedule.values()) == 512 and pruner.proportional_attention
    assert built("tome", info()).budget == 576 - 23 * 16  # constant r = 16
    assert built("tome", info(), r=8).budget == 576 - 23 * 8


def vision_state(hidden: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor, layer: int = 0) -> TokenState:
    """VISION_LAYER state: CLS at slot 0, then patches in order."""
    bsz, n, _ = hidden.shape
    slots = torch.arange(n).expand(bsz, n)
    return TokenState(hidden=hidden, valid=torch.ones(bsz, n, dtype=torch.bool), visual=slots > 0,
                      positions=slots - 1, origin=slots, sizes=sizes, stage=Stage.VISION_LAYER, layer=layer,
                      grid=(2, 3), extras={"keys": keys})


def test_tome_merges_most_similar_pair_by_size_weighted_mean():
    e = torch.eye(4)
    # Head-mean keys: CLS equals p1 (it would merge first were it not protected); p2 ~ p5 (cos .995),
    # then p0 ~ p1 (cos .71); p4's best link is weaker (p3, cos .45).
    mean_keys = torch.stack([e[0] + e[1], e[0], e[0] + e[1], e[2], e[3], e[3] - 2 * e[0], e[2] + 0.1 * e[3]])
    noise = torch.randn(7, 4)
    keys = torch.stack([mean_keys + noise, mean_keys - noise])[None]  # (1, H=2, 7, 4)
    hidden = torch.randn(1, 7, 5)
    sizes = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0]])
    pruner = built("tome", info(visual_tokens=6, grid=(2, 3), vision_feature_layer=1), budget=5)
    out = pruner.vision_layer(vision_state(hidden, keys, sizes))
    # A = p0, p2, p4 (slots 1, 3, 5), B = p1, p3, p5 (slots 2, 4, 6): p2 (slot 3) merges into p5 (slot 6).
    assert out.origin.tolist() == [[0, 1, 2, 4, 5, 6]]
    assert out.positions.tolist() == [[-1, 0, 1, 3, 4, 5]]  # the merged token keeps p5's patch index
    assert torch.allclose(out.hidden[0, -1], (2 * hidden[0, 3] + 3 * hidden[0, 6]) / 5)
    assert torch.equal(out.hidden[0, :3], hidden[0, :3])  # CLS and the others untouched
    assert out.sizes.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 5.0]] and out.sizes.sum() == sizes.sum()
    two = built("tome", info(visual_tokens=6, grid=(2, 3), vision_feature_layer=1), budget=4)
    out = two.vision_layer(vision_state(hidden, keys, sizes))
    assert out.origin.tolist() == [[0, 2, 4, 5, 6]]  # next: p0 into p1; CLS is never merged


def test_tome_reaches_the_budget_over_layers_with_sizes_conserved():
    pruner = built("tome", info(visual_tokens=16, grid=(4, 4), vision_feature_layer=3), budget=5)
    state = vision_state(torch.randn(2, 17, 3), torch.randn(2, 2, 17, 4), torch.ones(2, 17))
    for layer in pruner.vision_layers:
        keys = torch.randn(2, 2, state.num_tokens, 4)
        state = pruner.vision_layer(state.replace(layer=layer, extras={"keys": keys}))
    assert state.valid.sum(-1).tolist() == [6, 6]  # CLS + 5
    assert state.sizes.sum(-1).tolist() == [17.0, 17.0]
    assert state.origin[:, 0].tolist() == [0, 0] and (state.positions[:, 1:].diff() > 0).all()
    assert math.isclose(sum(pruner.schedule.values()), 11)
