"""MustDrop: window merge, key token set, dual-attention filtering, output-aware cache, end to end."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import generate_new_tokens, llava15_info, make_inputs, setup_pruner, slice_inputs, vision_state

import pruners
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods import mustdrop
from pruners.methods.mustdrop import window_patches, window_similarity

NEW_TOKENS = 4


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def info(visual_tokens: int = 576, grid: tuple[int, int] = (24, 24), **changes) -> ModelInfo:
    return llava15_info(visual_tokens=visual_tokens, grid=grid, **changes)


built = functools.partial(setup_pruner, "mustdrop")


def window_grid_tokens(noise: dict[int, float], grid=(6, 6), dim=16) -> torch.Tensor:
    """(1, 1 + P, dim): CLS + random patches; the patches of window w are one vector + noise[w] * randn."""
    hidden = torch.randn(1, 1 + grid[0] * grid[1], dim)
    windows = window_patches(grid, 3)
    for w, scale in noise.items():
        hidden[0, 1 + windows[w]] = torch.randn(dim) + scale * torch.randn(9, dim)
    return hidden


# ---------------------------------------------------------------- stage 1: window merge


def test_window_similarity_is_the_mean_over_ordered_pairs():
    tokens = torch.randn(2, 3, 9, 5)
    expected = torch.zeros(2, 3)
    for a in range(9):
        for b in range(9):
            if a != b:
                expected += torch.nn.functional.cosine_similarity(tokens[:, :, a], tokens[:, :, b], dim=-1)
    assert torch.allclose(window_similarity(tokens), expected / 72, atol=1e-6)


def test_windows_above_tau_merge_into_their_mean_in_official_order():
    hidden = window_grid_tokens({0: 0.01, 3: 0.1})  # windows 0 and 3 nearly uniform, 1 and 2 random
    state = vision_state(hidden, (6, 6))
    windows = window_patches((6, 6), 3)
    score = window_similarity(hidden[:, 1 + windows])[0]
    assert score[0] > score[3] >= 0.8 > score[1].abs().max(score[2].abs())
    out = built(info(36, (6, 6))).vision_layer(state)
    assert out.num_tokens == 1 + 36 - 2 * 8
    # CLS, merged windows by descending similarity (0 then 3), then unmerged patches in raster order.
    unmerged = sorted(set(range(36)) - set(windows[0].tolist()) - set(windows[3].tolist()))
    assert out.origin[0].tolist() == [0, 1 + windows[0, 0], 1 + windows[3, 0]] + [1 + p for p in unmerged]
    assert torch.allclose(out.hidden[0, 1], hidden[0, 1 + windows[0]].mean(0), atol=1e-6)
    assert torch.allclose(out.hidden[0, 2], hidden[0, 1 + windows[3]].mean(0), atol=1e-6)
    assert torch.equal(out.hidden[0, 3:], hidden[0, [1 + p for p in unmerged]])
    assert out.sizes[0, :3].tolist() == [1, 9, 9] and (out.sizes[0, 3:] == 1).all()
    assert out.positions[0].tolist() == [-1] + list(range(20))  # image slot = rank in the official order


def test_raster_order_keeps_a_merged_window_at_its_top_left_patch():
    hidden = window_grid_tokens({0: 0.01, 3: 0.1})
    out = built(info(36, (6, 6)), order="raster").vision_layer(vision_state(hidden, (6, 6)))
    windows = window_patches((6, 6), 3)
    gone = set(windows[0, 1:].tolist()) | set(windows[3, 1:].tolist())
    assert out.positions[0].tolist() == [-1] + [p for p in range(36) if p not in gone]
    assert torch.allclose(out.hidden[0, 1], hidden[0, 1 + windows[0]].mean(0), atol=1e-6)


def test_tau_is_inclusive():
    hidden = window_grid_tokens({0: 0.01, 3: 0.1})
    windows = window_patches((6, 6), 3)
    tau = float(window_similarity(hidden[:, 1 + windows])[0, 3])
    assert built(info(36, (6, 6)), tau=tau).vision_layer(vision_state(hidden, (6, 6))).num_tokens == 1 + 36 - 16
    above = float(torch.nextafter(torch.tensor(tau), torch.tensor(2.0)))  # next float32: scores are float32
    assert built(info(36, (6, 6)), tau=above).vision_layer(vision_state(hidden, (6, 6))).num_tokens == 1 + 36 - 8


def test_budget_caps_the_merge_at_the_most_similar_windows():
    hidden = window_grid_tokens({0: 0.1, 3: 0.01})  # window 3 is the more uniform one
    out = built(info(36, (6, 6)), budget=28).vision_layer(vision_state(hidden, (6, 6)))  # room for one merge
    assert out.num_tokens == 1 + 36 - 8
    assert out.sizes[0, 1] == 9 and out.origin[0, 1] == 1 + window_patches((6, 6), 3)[3, 0]


def test_only_full_windows_merge_on_a_grid_not_divisible_by_the_window():
    hidden = torch.randn(1, 1, 8).expand(1, 65, 8).clone()  # every patch identical
    out = built(info(64, (8, 8)), order="raster").vision_layer(vision_state(hidden, (8, 8)))
    edge = [p for p in range(64) if p // 8 >= 6 or p % 8 >= 6]
    assert out.positions[0].tolist() == [-1] + sorted([0, 3, 24, 27] + edge)


def test_each_image_merges_its_own_windows_in_a_batch():
    one = window_grid_tokens({0: 0.01, 3: 0.1})
    other = torch.randn(1, 37, 16)  # nothing to merge
    pruner = built(info(36, (6, 6)))
    batched = pruner.vision_layer(vision_state(torch.cat([one, other]), (6, 6)))
    alone = pruner.vision_layer(vision_state(one, (6, 6)))
    assert batched.valid.sum(-1).tolist() == [21, 37]
    width = alone.num_tokens
    assert torch.equal(batched.hidden[0, -width:], alone.hidden[0])
    assert torch.equal(batched.positions[0, -width:], alone.positions[0])
    assert torch.equal(batched.hidden[1], other[0]) and batched.positions[1].tolist() == list(range(-1, 36))


# ---------------------------------------------------------------- stage 1b: key token set


def output_state(counts: list[int], width: int) -> TokenState:
    """VISION_OUTPUT state of left-padded images with the given patch counts."""
    slots = torch.arange(width)
    valid = torch.stack([slots >= width - c for c in counts])
    positions = torch.where(valid, slots - (width - torch.tensor(counts))[:, None], -1)
    return TokenState(
        hidden=torch.randn(len(counts), width, 4),
        valid=valid,
        visual=valid.clone(),
        positions=positions,
        origin=positions,
        sizes=valid.float(),
        stage=Stage.VISION_OUTPUT,
        grid=(24, 24),
        num_images=torch.ones(len(counts), dtype=torch.long),
    )


def test_key_set_is_the_top_cls_attention_of_each_image():
    state = output_state([10, 7], width=10)
    # Feature slots: sample 0 = CLS at 0, patches 1..10; sample 1 = padding 0..2, CLS at 3, patches 4..10.
    cls_row = torch.rand(2, 11)
    cls_row[0, 1 + torch.tensor([7, 2, 5])] = torch.tensor([3.0, 2.0, 1.5])
    cls_row[1, 1 + torch.tensor([9, 4])] = torch.tensor([3.0, 2.0])
    cls_row[1, :3] = 9.0  # padding columns must never be chosen
    calls = []

    def probe(query_index, heads="mean", logits=False):
        calls.append((query_index.tolist(), heads, logits))
        return cls_row[:, None]

    state.extras["vision_attention"] = probe
    out = built(info(), key_ratio=0.25).vision_output(state)
    assert calls == [([[0], [3]], "mean", False)]
    # ceil(0.25 * 10) = 3 and ceil(0.25 * 7) = 2 tokens.
    assert out.protected[0].nonzero()[:, 0].tolist() == [2, 5, 7]
    assert out.protected[1].nonzero()[:, 0].tolist() == [4, 9]
    capped = built(info(), key_ratio=0.25, budget=2).vision_output(state)
    assert capped.protected[0].nonzero()[:, 0].tolist() == [2, 7]  # the budget keeps the highest
    assert built(info()).vision_output(output_state([576], 576)).protected is None  # no probe: no key set


def test_key_set_default_size_is_ceil_8_percent():
    state = output_state([576], 576)
    state.extras["vision_attention"] = lambda q, heads="mean", logits=False: torch.rand(1, 1, 577)
    assert int(built(info()).vision_output(state).protected.sum()) == 47


# ---------------------------------------------------------------- stage 2: dual-attention filtering

THR_G, THR_I = 0.1, 0.2
# Attention of the 3 text rows after the image to the 6 visual tokens (columns j0..j5).
TEXT_TO_VISUAL = torch.tensor(
    [
        [0.50, 0.15, 0.00, 0.01, 0.0, 0.05],
        [0.50, 0.15, 0.00, 0.01, 0.0, 0.05],
        [0.50, 0.15, 0.21, 0.01, 0.0, 0.05],
    ]
)
# Sum 2.34, so theta_g * sum = 0.234. j0 strong on both; j1 global only (G .45, M .15); j2 individual
# only (G .21, M .21); j3, j4, j5 weak on both (G < .234 and M < .2): exactly those are dropped.


def llm_state(pad: int = 0, protected: list[int] | None = None, layer: int = 2) -> tuple[TokenState, list]:
    """2 system tokens, 6 visual (slots 2..7), 3 text tokens (8..10), after `pad` left-padding slots."""
    n = pad + 11
    attn = torch.zeros(n, n)
    attn[pad + 8 :, pad + 2 : pad + 8] = TEXT_TO_VISUAL
    attn[pad : pad + 2, pad + 2 : pad + 8] = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # system rows: ignored
    slots = torch.arange(n)
    valid = slots >= pad
    visual = (slots >= pad + 2) & (slots < pad + 8)
    flags = torch.zeros(n, dtype=torch.bool)
    flags[[pad + 2 + j for j in protected or []]] = True
    calls = []

    def probe(query_index, heads="mean", logits=False):
        calls.append(query_index)
        return attn[query_index]

    state = TokenState(
        hidden=torch.randn(1, n, 4),
        valid=valid[None],
        visual=visual[None],
        positions=torch.where(valid, slots - pad, 0)[None],
        origin=torch.where(valid, slots, -1)[None],
        sizes=torch.ones(1, n),
        stage=Stage.LLM_LAYER,
        layer=layer,
        grid=(24, 24),
        num_images=torch.ones(1, dtype=torch.long),
        probe=probe,
        protected=flags[None],
    )
    return state, calls


def kept_visual(state: TokenState) -> list[int]:
    """Kept visual tokens as column numbers j (origin - 2 - padding)."""
    vis = state.visual[0] & state.valid[0]
    first = int(state.origin[0][state.valid[0]][0])
    return (state.origin[0][vis] - first - 2).tolist()


def test_dual_attention_drops_exactly_the_tokens_weak_on_both_criteria():
    pruner = built(info(), global_thr=THR_G, individual_thr=THR_I)
    state, calls = llm_state()
    out = pruner.llm_layer(state)
    assert kept_visual(out) == [0, 1, 2]
    assert calls[0].tolist() == [[8, 9, 10]]  # only the text after the image is queried
    padded, _ = llm_state(pad=2)
    assert kept_visual(pruner.llm_layer(padded)) == [0, 1, 2]
    assert pruner.llm_layer(llm_state(layer=3)[0]).num_tokens == 11  # not a pruning layer


def test_protected_tokens_survive_even_with_the_lowest_attention():
    pruner = built(info(), global_thr=THR_G, individual_thr=THR_I)
    state, _ = llm_state(protected=[4])  # j4 receives no attention at all
    out = pruner.llm_layer(state)
    assert kept_visual(out) == [0, 1, 2, 4]
    assert out.protected[0][out.visual[0]].tolist() == [False, False, False, True]


def test_budget_mode_ranks_by_the_dual_criterion_with_protected_first():
    # Scores max(G / (theta_g * sum G), M / theta_i): j0 6.4, j1 1.92, j2 1.05, j5 .64, j3 .13, j4 0.
    pruner = built(info(), budget=3, global_thr=THR_G, individual_thr=THR_I)
    assert kept_visual(pruner.llm_layer(llm_state(layer=14)[0])) == [0, 1, 2]  # last pruning layer: budget
    assert kept_visual(pruner.llm_layer(llm_state(layer=14, protected=[4])[0])) == [0, 1, 4]
    assert kept_visual(
        built(info(), budget=1, global_thr=THR_G, individual_thr=THR_I).llm_layer(llm_state(layer=14, protected=[3])[0])
    ) == [3]


def test_budget_schedule_is_geometric_and_ends_at_the_budget():
    pruner = built(info(), budget=64)
    counts, n = [], 576
    for layer in pruner.llm_layers:
        state = output_state([n], n).replace(stage=Stage.LLM_LAYER, layer=layer)
        n = int(pruner._layer_target(state))
        counts.append(n)
    assert counts == [333, 192, 111, 64]  # 576 * (64 / 576) ** (i / 4), rounded step by step


# ---------------------------------------------------------------- setup and arguments


def test_layer_schedules_scale_with_depth():
    assert built(info()).llm_layers == (2, 6, 10, 14)
    assert built(info(llm_layers=4)).llm_layers == (0, 1, 2)
    assert built(info(llm_layers=2)).llm_layers == (0,)
    assert built(info()).vision_layers == (0,)
    assert mustdrop.OFFICIAL_THRESHOLDS[64] == (1.1e-2, 1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": 1}, r"window must be an int >= 2, got 1"),
        ({"tau": 1.5}, r"tau must be a number in \[-1.0, 1.0\], got 1.5"),
        ({"key_ratio": -0.1}, r"key_ratio must be a number in \[0.0, 1.0\], got -0.1"),
        ({"global_thr": 0}, r"global_thr must be a number in \(0.0, 1.0\], got 0"),
        ({"individual_thr": 2.0}, r"individual_thr must be a number in \(0.0, 1.0\], got 2.0"),
        ({"prune_layers": []}, r"prune_layers must be a non-empty list of ints >= 0, got \[\]"),
        ({"prune_layers": (2, -1)}, r"prune_layers entry must be an int >= 0, got -1"),
        ({"merge_layer": "0"}, r"merge_layer must be an int >= 0, got '0'"),
        ({"order": "sorted"}, r"order must be one of \('official', 'raster'\), got 'sorted'"),
        ({"output_aware_cache": 1}, r"output_aware_cache must be True or False, got 1"),
        ({"budget": 0}, r"budget must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("mustdrop", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match=r"merge_layer 30 .* out of range: allowed 0..22"):
        built(info(), merge_layer=30)
    with pytest.raises(ValueError, match=r"key_ratio 0.08 needs .* allowed key_ratio: 0"):
        built(info(vision_feature_layer=24))
    built(info(vision_feature_layer=24), key_ratio=0.0)
    with pytest.raises(ValueError, match=r"decoder has 1 layer\(s\); allowed: at least 2"):
        built(info(llm_layers=1))
    with pytest.raises(ValueError, match=r"budget 577 is out of range.*allowed 1..576"):
        built(info(), budget=577)


# ---------------------------------------------------------------- end to end on the tiny model


generate = functools.partial(generate_new_tokens, new_tokens=NEW_TOKENS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": 32},
        {"budget": 32, "tau": -1.0},  # every full window above tau: the merge cap decides
        {"global_thr": 0.02, "individual_thr": 0.05},  # threshold mode, adaptive counts
        {"global_thr": 0.02, "individual_thr": 0.05, "tau": -1.0, "order": "raster"},
    ],
)
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, pruners.build("mustdrop", **kwargs))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("mustdrop", **kwargs))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


@pytest.mark.parametrize("tau", [0.8, -1.0])
def test_budget_is_met_exactly(tiny_llava, tau):
    _, stats = generate(
        tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build("mustdrop", budget=32, tau=tau), report=True
    )
    assert stats["visual_tokens"] == 32
    if tau < 0:  # all 4 full windows merge: 64 - 4 * 8 = 32 tokens enter the LLM
        assert stats["visual_tokens_llm_input"] == 32 and stats["vision_tokens_per_layer"] == [65, 33]


def test_threshold_mode_reports_its_adaptive_count(tiny_llava):
    pruner = pruners.build("mustdrop", global_thr=0.02, individual_thr=0.05)
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruner, report=True)
    per_layer = stats["visual_tokens_per_layer"]
    assert pruner.budget is None
    assert 6 <= stats["visual_tokens"] < 64  # at least the key set (ceil(0.08 * 64) = 6) survives
    assert per_layer[0] == 64 and all(a >= b for a, b in zip(per_layer, per_layer[1:]))


def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    assert torch.equal(generate(tiny_llava, inputs, pruners.build("mustdrop", budget=64)), generate(tiny_llava, inputs))


def cls_attention_reference(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Head-mean CLS attention of CLIP layer 2 (the one after the features), computed by hand."""
    tower = model.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[2]
    layer = tower.encoder.layers[2]
    normed = layer.layer_norm1(hidden)
    heads = layer.self_attn.num_heads
    q, k = (
        proj(normed).view(*normed.shape[:2], heads, -1).transpose(1, 2)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj)
    )
    attn = (q @ k.transpose(-1, -2) * layer.self_attn.scale).softmax(-1).mean(1)
    return attn[:, 0, 1:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": 6},  # budget = the key set's size, ceil(0.08 * 64)
        {"global_thr": 1.0, "individual_thr": 1.0},  # threshold mode where every token is weak on both
    ],
)
def test_key_set_reaches_the_llm_and_is_never_dropped(tiny_llava, kwargs):
    """The survivors must be exactly the key set, the top-6 CLS attention patches of CLIP layer 2,
    whatever the LLM attention says."""
    inputs = slice_inputs(make_inputs(tiny_llava, [5]), 0)
    pruner = pruners.build("mustdrop", tau=1.0, **kwargs)  # tau 1: no window merges, patches stay raster
    seen = {}
    vision_output, llm_layer = pruner.vision_output, pruner.llm_layer

    def spy_vision(state):
        seen["key"] = vision_output(state)
        return seen["key"]

    def spy_llm(state):
        seen["llm"] = llm_layer(state)
        return seen["llm"]

    pruner.vision_output, pruner.llm_layer = spy_vision, spy_llm
    with torch.no_grad():
        expected = cls_attention_reference(tiny_llava, inputs["pixel_values"])[0].topk(6).indices.sort().values
        with pruners.attach(tiny_llava, pruner):
            tiny_llava(**inputs)
    key = seen["key"]
    assert key.positions[0][key.protected[0]].tolist() == expected.tolist()
    final = seen["llm"]
    survivors = final.origin[0][final.visual[0] & final.valid[0]] - 2  # image slots start at input index 2
    assert survivors.tolist() == expected.tolist()


@pytest.mark.parametrize("aware", [True, False])
def test_decode_trims_the_pruning_layers_caches_to_the_final_survivors(tiny_llava, aware):
    inputs = slice_inputs(make_inputs(tiny_llava, [5]), 0)
    length = inputs["input_ids"].shape[1]
    # Layers 8 and 16 of 32 are layers 1 and 2 of the 4-layer decoder: layer 0 keeps its full cache.
    pruner = pruners.build("mustdrop", budget=16, prune_layers=(8, 16), output_aware_cache=aware)
    seen = {}
    decode = pruner.decode

    def spy(cache):
        decode(cache)
        if cache.step == 0:
            seen["origins"] = [cache.slots(i).origin[0].tolist() for i in range(cache.num_layers)]

    pruner.decode = spy
    with torch.no_grad(), pruners.attach(tiny_llava, pruner):
        out = tiny_llava.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    origins = seen["origins"]
    assert lengths[0] == length + 2 and origins[0] == list(range(length))  # two decoded tokens fed back
    assert lengths[3] == length - (64 - 16) + 2
    if aware:
        assert lengths[1] == lengths[2] == lengths[3] and origins[1] == origins[2] == origins[3]
    else:
        assert lengths[1] == length + 2 and lengths[3] < lengths[2] < lengths[1]
