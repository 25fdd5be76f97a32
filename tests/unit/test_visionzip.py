"""VisionZip (METHODS.md §6): dominant = top CLS attention, contextual = target + mean of its group,
the budget split, the official reference on an eager CLIP, and end-to-end runs on the tiny model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs, vision_state

import pruners
import pruners.methods.visionzip  # noqa: F401  (registers "visionzip")
from pruners.base import ModelInfo, TokenState
from pruners.methods.visionzip import PAPER_SPLITS, contextual_targets, split_budget

NEW_TOKENS = 4
GRID = (4, 4)  # 16 patches + CLS in the constructed states


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def small_info(**changes) -> ModelInfo:
    """A 16-patch model whose features are the output of vision layer 1 (hooked layer 1)."""
    return llava15_info(**{"visual_tokens": 16, "grid": GRID, "vision_layers": 3, "vision_feature_layer": 2, **changes})


built = functools.partial(setup_pruner, "visionzip")


class RowProbe:
    """A probe that answers the CLS row with a constructed attention pattern and records its queries."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.asked = rows, []

    def __call__(self, query_index, heads="mean", logits=False):
        self.asked.append((query_index.clone(), heads, logits))
        return self.rows[:, None, :]


def hooked_state(hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor | None = None) -> TokenState:
    """The state the hook gets after vision layer 1: slot 0 = CLS, slot 1 + p = patch p."""
    if keys is None:
        keys = torch.randn(hidden.shape[0], 2, hidden.shape[1], 4)
    state = vision_state(hidden, GRID, probe=RowProbe(attention))
    return state.replace(layer=1, extras={"keys": keys})


def out_patches(out: TokenState, row: int = 0) -> list[int]:
    """Original patch index of each output token (origin - 1; CLS = -1), in output order."""
    return (out.origin[row][out.valid[row]] - 1).tolist()


# ---------------------------------------------------------------- budget split


def test_paper_splits_and_the_proportional_rule():
    for budget, pair in PAPER_SPLITS.items():
        assert split_budget(budget) == pair
    assert split_budget(32) == (27, 5)  # 5/32 of 32 = 5
    assert split_budget(16) == (13, 3)  # 2.5 rounds half up
    assert [split_budget(b)[1] for b in (1, 2, 3, 4)] == [0, 0, 0, 1]


def test_setup_resolves_the_counts():
    p = built(llava15_info(), budget=64)
    assert (p.budget, p.dominant, p.contextual, p.vision_layers) == (64, 54, 10, (22,))
    p = built(llava15_info(), budget=64, keep_cls=True)  # official: CLS + 53 patches + 10
    assert (p.dominant, p.contextual) == (53, 10)
    p = built(llava15_info(), budget=100, contextual=0)
    assert (p.dominant, p.contextual) == (100, 0)
    assert built(llava15_info()).budget == 64  # default: the README's 54 + 10
    p = built(llava15_info(visual_tokens=577), budget=64)  # 'full' strategy: CLS always counts
    assert (p.cls_kept, p.dominant, p.contextual) == (True, 53, 10)


# ---------------------------------------------------------------- dominant tokens


def test_dominant_set_is_the_top_cls_attention():
    hidden = torch.randn(2, 17, 8)
    attention = torch.rand(2, 17)
    attention[:, 0] = 10.0  # CLS attends to itself most: it must never count as a patch
    p = built(small_info(), budget=6, contextual=0)
    state = hooked_state(hidden, attention)
    out = p.vision_layer(state)
    for b in range(2):
        expected = sorted((attention[b, 1:].topk(6).indices).tolist())
        assert out_patches(out, b) == expected  # raster order, CLS dropped
        kept = out.origin[b][out.valid[b]]
        assert torch.equal(out.hidden[b][out.valid[b]], hidden[b, kept])  # dominant tokens unchanged
    ((query, heads, logits),) = state.probe.asked
    assert query.tolist() == [[0], [0]] and heads == "mean" and not logits  # the CLS row, probabilities


def test_dominant_ties_go_to_the_earlier_patch():
    attention = torch.zeros(1, 17)
    attention[0, [3, 5, 9, 12]] = 1.0  # four equal maxima, keep three
    out = built(small_info(), budget=3, contextual=0).vision_layer(hooked_state(torch.randn(1, 17, 8), attention))
    assert out_patches(out) == [2, 4, 8]


def test_keep_cls_passes_cls_first_as_a_visual_token():
    attention = torch.arange(17.0)[None]  # patch 15 highest, then 14, ...
    out = built(small_info(), budget=4, contextual=0, keep_cls=True).vision_layer(
        hooked_state(torch.randn(1, 17, 8), attention)
    )
    assert out_patches(out) == [-1, 13, 14, 15]  # CLS + top 3 patches
    assert out.visual[0].all() and out.positions[0].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- contextual tokens


def test_targets_are_evenly_spaced_over_the_remaining_tokens():
    remaining = torch.zeros(1, 30, dtype=torch.bool)
    remaining[0, 3:26] = True  # M = 23 remaining slots; C = 4 -> step 5, ranks 0, 5, 10, 15
    targets = contextual_targets(remaining, 4)
    assert targets[0].nonzero()[:, 0].tolist() == [3, 8, 13, 18]
    assert contextual_targets(remaining, 23).sum() == 23  # step 1: every remaining slot
    assert not contextual_targets(remaining, 0).any()


def test_contextual_token_is_its_target_plus_the_mean_of_its_group():
    # Patches 0..3 are dominant (highest CLS attention); the 12 left (4..15) with C = 3 give
    # step 4, targets 4, 8, 12. Keys put every other patch next to a chosen target.
    attention = torch.zeros(1, 17)
    attention[0, 1:5] = 1.0
    directions = torch.eye(4)[:3]  # one key direction per target
    group = {5: 0, 6: 1, 7: 0, 9: 0, 10: 0, 11: 1, 13: 1, 14: 1, 15: 1}  # target 12 (index 2) gets none
    metric = torch.randn(17, 4)
    for t, target in enumerate((4, 8, 12)):
        metric[1 + target] = directions[t]
    for patch, t in group.items():
        metric[1 + patch] = 3.0 * directions[t] + 0.1 * torch.randn(4)
    keys = torch.stack([metric + 1.0, metric - 1.0])[None]  # (1, 2 heads, 17, 4): head mean = metric
    hidden = torch.randn(1, 17, 8)
    out = built(small_info(), budget=7, contextual=3).vision_layer(hooked_state(hidden, attention, keys))
    assert out_patches(out) == [0, 1, 2, 3, 4, 8, 12]  # official order: dominant, then targets
    for col, target in enumerate((4, 8, 12)):
        members = [1 + p for p, t in group.items() if t == col]
        expected = hidden[0, 1 + target] + (hidden[0, members].mean(0) if members else 0.0)
        assert torch.allclose(out.hidden[0, 4 + col], expected, atol=1e-6)
        assert out.sizes[0, 4 + col] == 1 + len(members)
    assert torch.equal(out.hidden[0, :4], hidden[0, 1:5])  # dominant tokens unchanged


def test_orders_place_tokens_in_their_image_slots():
    attention = torch.rand(1, 17)
    hidden, keys = torch.randn(1, 17, 8), torch.randn(1, 2, 17, 4)
    official = built(small_info(), budget=6, contextual=2).vision_layer(hooked_state(hidden, attention, keys))
    raster = built(small_info(), budget=6, contextual=2, order="raster").vision_layer(
        hooked_state(hidden, attention, keys)
    )
    assert official.positions[0].tolist() == list(range(6))  # consecutive slots from the first
    assert raster.positions[0].tolist() == out_patches(raster)  # each at its own / its target's patch
    assert torch.equal(official.hidden, raster.hidden)  # same tokens, only the slots differ


def test_full_strategy_keeps_cls_in_image_slot_zero():
    out = built(small_info(visual_tokens=17), budget=5, contextual=1).vision_layer(
        hooked_state(torch.randn(1, 17, 8), torch.rand(1, 17))
    )
    assert out_patches(out)[0] == -1 and out.positions[0].tolist() == [-1, 0, 1, 2, 3]


def test_other_layers_pass_through():
    state = hooked_state(torch.randn(1, 17, 8), torch.rand(1, 17)).replace(layer=0)
    assert built(small_info(), budget=4).vision_layer(state) is state


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, "budget must be at least 1"),
        ({"budget": 3.0}, "budget must be an int"),
        ({"contextual": -1}, "contextual must be an int >= 0"),
        ({"contextual": True}, "contextual must be an int >= 0"),
        ({"keep_cls": 1}, "keep_cls must be True or False"),
        ({"order": "sorted"}, "order must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("visionzip", **kwargs)


@pytest.mark.parametrize(
    "info, kwargs, message",
    [
        (llava15_info(), {"budget": 577}, r"budget 577 is out of range .* allowed 1\.\.576"),
        (
            llava15_info(),
            {"budget": 8, "contextual": 9},
            r"contextual 9 does not fit budget 8: allowed contextual 0\.\.8",
        ),
        (llava15_info(), {"budget": 8, "contextual": 8, "keep_cls": True}, r"allowed contextual 0\.\.7"),
        (llava15_info(), {"budget": 8, "keep_cls": True, "order": "raster"}, "allowed: order='official'"),
        (llava15_info(vision_feature_layer=0), {"budget": 8}, "allowed: vision_feature_layer >= 1"),
        (llava15_info(has_cls=False), {"budget": 8}, "with a CLS token"),
        (small_info(), {}, r"default budget 64 is out of range .* allowed 1\.\.16"),
    ],
)
def test_bad_setups_are_rejected(info, kwargs, message):
    with pytest.raises(ValueError, match=message):
        built(info, **kwargs)


# ---------------------------------------------------------------- the official algorithm on an eager CLIP


def official_reference(model, pixels: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """The official CLIP-side VisionZip written out per image from HF's eager outputs: CLS + top
    (dominant - 1) patches by head-summed CLS attention of layer -2, then contextual tokens."""
    tower = model.model.vision_tower
    out = tower(pixels, output_hidden_states=True, output_attentions=True)
    layer = tower.encoder.layers[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    metric = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)  # head mean
    result = []
    for b in range(pixels.shape[0]):
        hidden, cls_row = out.hidden_states[-2][b], out.attentions[-2][b].sum(0)[0, 1:]
        top = sorted((cls_row.topk(dominant - 1).indices + 1).tolist())
        rest = [i for i in range(hidden.shape[0]) if i not in [0, *top]]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [i for i in rest if i not in targets]
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        choice = (unit[others] @ unit[targets].T).argmax(-1).tolist()
        tokens = [hidden[i] for i in [0, *top]]
        for col, t in enumerate(targets):
            group = [others[j] for j, c in enumerate(choice) if c == col]
            tokens.append(hidden[t] + (hidden[group].mean(0) if group else 0.0))
        result.append(torch.stack(tokens))
    return torch.stack(result)


def projector_input(model, pruner, inputs) -> torch.Tensor:
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), pruners.attach(model, pruner):
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_matches_the_official_algorithm_on_eager_attention(tiny_llava):
    """keep_cls=True, order='official' is the official pipeline; the reference reads HF's eager attention."""
    eager = make_llava(attn="eager")  # the same seed and weights as tiny_llava
    inputs = make_inputs(tiny_llava, [3, 9])
    with torch.no_grad():
        expected = official_reference(eager, inputs["pixel_values"], dominant=27, contextual=5)
    got = projector_input(tiny_llava, pruners.build("visionzip", budget=32, keep_cls=True), inputs)
    assert got.shape == expected.shape == (2, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5)
    assert tiny_llava.config._attn_implementation == "sdpa"  # the model never went eager


# ---------------------------------------------------------------- end to end on the tiny model


def generate(model, inputs, pruner=None):
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, **kw)[:, -NEW_TOKENS:], None
        with pruners.attach(model, pruner) as report:
            return model.generate(**inputs, **kw)[:, -NEW_TOKENS:], report


@pytest.mark.parametrize("kwargs", [{}, {"keep_cls": True}, {"order": "raster"}])
@pytest.mark.parametrize("budget", [32, 5, 64])
def test_budget_reaches_the_last_layer(tiny_llava, budget, kwargs):
    _, report = generate(
        tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build("visionzip", budget=budget, **kwargs)
    )
    stats = report.as_dict()
    assert stats["visual_tokens"] == budget and stats["num_samples"] == 2


@pytest.mark.parametrize("kwargs", [{}, {"keep_cls": True}, {"order": "raster", "contextual": 9}])
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched, _ = generate(tiny_llava, inputs, pruners.build("visionzip", budget=32, **kwargs))
    for i in range(2):
        alone, _ = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("visionzip", budget=32, **kwargs))
        assert torch.equal(batched[i], alone[0])


def test_keep_everything_budget_reproduces_unpruned_generation_in_raster_order(tiny_llava):
    # Budget 64 of 64: 54 dominant + 10 targets with nothing left to merge, every token at its own slot.
    inputs = make_inputs(tiny_llava, [3, 8])
    full = pruners.build("visionzip", budget=64, order="raster")
    pruned, _ = generate(tiny_llava, inputs, full)
    assert torch.equal(pruned, generate(tiny_llava, inputs)[0])
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits[:, -1]
        with pruners.attach(tiny_llava, full):
            out = tiny_llava(**inputs).logits[:, -1]
    assert (ref - out).abs().max() <= 1e-5


@pytest.mark.parametrize("order", ["official", "raster"])
def test_full_feature_strategy_counts_cls_and_keeps_everything_in_raster_order(order):
    model = make_llava(strategy="full")  # 65 image tokens: CLS + 64 patches
    inputs = make_inputs(model, [3, 9])
    _, report = generate(model, inputs, pruners.build("visionzip", budget=32, order=order))
    assert report.as_dict()["visual_tokens"] == 32
    if order == "raster":
        pruned, _ = generate(model, inputs, pruners.build("visionzip", budget=65, order=order))
        assert torch.equal(pruned, generate(model, inputs)[0])
