"""FiCoCo (ficoco-v / -l / -vl): known answers for filter, correlate and compress on constructed logits, the
LLM "attn" hook point of the runtime, and end-to-end runs on the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs, vision_state

import pruners
from pruners.base import Pruner, Stage, TokenState
from pruners.methods.ficoco import choose, compress, correlate, llm_step, local_penalty, vision_step
from pruners.ops import compact_index

NAMES = ("ficoco-v", "ficoco-l", "ficoco-vl")


llava15 = llava15_info


built = setup_pruner


def fake_probe(matrix: torch.Tensor):
    """A probe that serves rows of a given (B, N, N) head-mean logit matrix."""

    def probe(query_index, heads="mean", logits=False):
        assert logits and heads == "mean", "FiCoCo reads head-mean pre-softmax logits"
        return torch.gather(matrix, 1, query_index[..., None].expand(-1, -1, matrix.shape[-1]))

    return probe


# ---------------------------------------------------------------- compress


def test_merged_token_is_the_papers_self_preserving_average():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [2.0, -2.0], [0.0, 0.0]]])
    # sources 0 and 1; source 0 -> targets 2 (0.25) and 3 (0.75); source 1 -> target 2 (1.0)
    src = torch.tensor([[0, 1]])
    index = torch.tensor([[[2, 3], [2, 4]]])
    alpha = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])
    state = TokenState(
        hidden=x,
        valid=torch.ones(1, 5, dtype=torch.bool),
        visual=torch.ones(1, 5, dtype=torch.bool),
        positions=torch.arange(5)[None],
        origin=torch.arange(5)[None],
        sizes=torch.ones(1, 5),
        stage=Stage.VISION_LAYER,
    )
    paper = compress(state, src, index, alpha, additive=False).hidden[0]
    # x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij)
    expected2 = (torch.tensor([4.0, 4.0]) + 0.25 * torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 2.0])) / 2.25
    expected3 = (torch.tensor([2.0, -2.0]) + 0.75 * torch.tensor([1.0, 0.0])) / 1.75
    assert torch.allclose(paper[2], expected2) and torch.allclose(paper[3], expected3)
    assert torch.equal(paper[4], x[0, 4])  # a zero weight changes nothing
    official = compress(state, src, index, alpha, additive=True).hidden[0]
    assert torch.allclose(official[2], torch.tensor([4.25, 6.0])) and torch.allclose(
        official[3], torch.tensor([2.75, -2.0])
    )


# ---------------------------------------------------------------- correlate


def test_k_comes_from_the_quantile_rule_and_is_one_per_sample():
    eps = 0.6
    rows = torch.tensor(
        [
            [[1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 1.0, 2.0, 0.0, 0.0]],
            [[1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 1.0, 2.0, 0.0, 0.0]],
        ]
    )
    allowed = torch.ones(2, 2, 5, dtype=torch.bool)
    allowed[0, 1, 3:] = False  # sample 0, source 1: 3 candidates
    allowed[1, :, 3:] = False  # sample 1: 3 candidates for both sources
    index, alpha = correlate(rows, allowed, torch.ones(2, 2, dtype=torch.bool), eps)
    # 5 candidates: quantile at rank 0.6 * 4 = 2.4 -> 2 entries above it; 3 candidates: rank 1.2 -> 1 entry.
    # Sample 0 takes k = max(2, 1) = 2 for both its sources; sample 1 takes k = 1. Entries past k weigh 0.
    assert (alpha > 0).sum(-1).tolist() == [[2, 2], [1, 1]] and torch.all(alpha[..., 2:] == 0)
    assert index[0, 0, :2].tolist() == [4, 3] and index[0, 1, :2].tolist() == [0, 2]
    assert torch.allclose(alpha[0, 0, :2], torch.tensor([5.0, 4.0]).softmax(0))
    assert torch.allclose(alpha[0, 1, :2], torch.tensor([9.0, 2.0]).softmax(0))
    assert index[1, 0, 0] == 2 and index[1, 1, 0] == 0 and torch.all(alpha[1, :, 0] == 1)


def test_k_at_the_papers_epsilon_on_576_candidates():
    rows = torch.linspace(-1, 1, 576).expand(1, 1, 576)
    index, alpha = correlate(rows, torch.ones(1, 1, 576, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), 0.998)
    # rank 0.998 * 575 = 573.85 lies between the 3rd and 2nd largest values: k = 2
    assert (alpha > 0).sum().item() == 2 and index[0, 0, :2].tolist() == [575, 574]
    assert torch.allclose(alpha.sum(-1), torch.ones(1, 1))


# ---------------------------------------------------------------- FiCoCo-V filter


def v_logits(b: list[float], cls_row: list[float]) -> torch.Tensor:
    """(1, 5, 5) logits: CLS row given; patch row i constant b_i over patches (its row mean); CLS column 0."""
    n = len(b) + 1
    a = torch.zeros(1, n, n)
    a[0, 0, 1:] = torch.tensor(cls_row)
    for i, value in enumerate(b, start=1):
        a[0, i, 1:] = value
    return a


def test_vision_filter_picks_the_hand_computed_sources():
    # a = CLS attention [3, 0, 4, 0] -> a_hat [0.6, 0, 0.8, 0]; b = row means [2, 0, 0, 1] -> b_hat [2, 0, 0, 1]/sqrt5
    # score = 0.35 a_hat - 0.65 b_hat = [-0.371, 0, 0.28, -0.291]: the two lowest are patches 0 and 3 (slots 1, 4),
    # although patch 0 has CLS attention: its redundancy outweighs it.
    logits = v_logits([2.0, 0.0, 0.0, 1.0], [3.0, 0.0, 4.0, 0.0])
    pruner = built("ficoco-v", llava15(), budget=64, penalty_scale=1)  # no local penalty here
    hidden = torch.randn(1, 5, 3)
    out = vision_step(vision_state(hidden, (2, 2), fake_probe(logits)), 2, pruner)
    assert out.positions[0].tolist() == [-1, 1, 2]  # CLS, patches 1 and 2 remain in order
    # "column" redundancy reads the attention a patch receives: every column mean of the patch block is 0.75
    # (its rows are constant), so only a_hat ranks: patches 1 and 3 go
    pruner = built("ficoco-v", llava15(), budget=64, penalty_scale=1, redundancy="column")
    out = vision_step(vision_state(hidden, (2, 2), fake_probe(logits)), 2, pruner)
    assert out.positions[0].tolist() == [-1, 0, 2]


def test_vision_correlate_and_compress_on_a_constructed_layer():
    logits = v_logits([2.0, 0.0, 0.0, 1.0], [3.0, 0.0, 4.0, 0.0])
    logits[0, 1, :] = torch.tensor([9.0, 0.0, 1.0, 5.0, 7.0])  # patch 0's row: CLS highest, then patch 3
    hidden = torch.randn(1, 5, 3)
    kept = built("ficoco-v", llava15(), budget=64, penalty_scale=1)
    out = vision_step(vision_state(hidden, (2, 2), fake_probe(logits)), 1, kept)
    # r = 1: the lowest score is still patch 0 (slot 1; row mean now 3.25); its allowed targets are patches 1, 2, 3
    # -> k = 1 -> patch 3 (slot 4) with alpha = 1: (x4 + x1) / 2. CLS and the others are untouched.
    assert out.positions[0].tolist() == [-1, 1, 2, 3]
    assert torch.allclose(out.hidden[0, 3], (hidden[0, 4] + hidden[0, 1]) / 2, atol=1e-6)
    assert torch.allclose(out.hidden[0, :3], hidden[0, [0, 2, 3]])
    # the official targets ("any") include CLS and the source itself: the best entry is CLS
    anyt = built("ficoco-v", llava15(), budget=64, penalty_scale=1, targets="any")
    out = vision_step(vision_state(hidden, (2, 2), fake_probe(logits)), 1, anyt)
    assert torch.allclose(out.hidden[0, 0], (hidden[0, 0] + hidden[0, 1]) / 2, atol=1e-6)


def test_local_penalty_moves_the_second_discard_to_another_window():
    # grid 2 x 4: windows {0, 1, 4, 5} and {2, 3, 6, 7} (patch indices)
    scores = torch.tensor([[0.30, 0.50, 0.20, 0.25, 0.50, 0.50, 0.90, 0.90]])
    patch = torch.arange(8)[None]
    cand = torch.ones(1, 8, dtype=torch.bool)
    two = torch.tensor([2])
    assert choose(scores, cand, two, lowest=True).nonzero()[:, 1].tolist() == [2, 3]  # both from window 2
    pushed = local_penalty(scores, cand, patch, (2, 4), 2, 2.0)
    # each window's minimum is pushed down: 0.30 -> 0.15, 0.20 -> 0.10; nothing else changes
    assert torch.allclose(pushed, torch.tensor([[0.15, 0.50, 0.10, 0.25, 0.50, 0.50, 0.90, 0.90]]))
    assert choose(pushed, cand, two, lowest=True).nonzero()[:, 1].tolist() == [0, 2]  # one per window
    # s < 0 becomes s * 2; of tied minima only the earliest slot is pushed (0 in window 1, 2 in window 2)
    negative = local_penalty(-scores.flip(-1), cand, patch, (2, 4), 2, 2.0)
    assert torch.allclose(negative, torch.tensor([[-1.8, -0.9, -1.0, -0.5, -0.25, -0.2, -0.5, -0.3]]))


def test_official_cls_order_reads_index_zero_as_cls_and_lends_its_slot_to_cls():
    logits = v_logits([2.0, 0.0, 0.0, 1.0], [3.0, 0.0, 4.0, 0.0])
    pruner = built("ficoco-v", llava15(), budget=64, penalty_scale=1, cls_order="official")
    out = vision_step(vision_state(torch.randn(1, 5, 3), (2, 2), fake_probe(logits)), 1, pruner)
    # scores [-0.371, 0, 0.28, -0.291]: patch 0 goes; survivors by ascending score: patch 3, patch 1, patch 2, CLS
    assert out.origin[0].tolist() == [4, 2, 3, 0]
    assert out.visual[0].tolist() == [False, True, True, True]  # index 0 (patch 3) is the next layer's "CLS"
    assert out.positions[0].tolist() == [-1, 1, 2, 3]  # CLS takes patch 3's image slot; patch 3 is dropped later


# ---------------------------------------------------------------- FiCoCo-L filter and correlate


def llm_state(logits: torch.Tensor, hidden: torch.Tensor) -> TokenState:
    """[sys, v0, v1, v2, v3, t0, t1]: 4 visual tokens, text after them."""
    n = hidden.shape[1]
    visual = torch.tensor([[False, True, True, True, True, False, False]])
    return TokenState(
        hidden=hidden,
        valid=torch.ones(1, n, dtype=torch.bool),
        visual=visual,
        positions=torch.arange(n)[None],
        origin=torch.arange(n)[None],
        sizes=torch.ones(1, n),
        stage=Stage.LLM_LAYER,
        layer=5,
        num_images=torch.tensor([1]),
        probe=fake_probe(logits),
    )


def test_llm_filter_picks_the_hand_computed_sources():
    a = torch.zeros(1, 7, 7)
    a[0, :, 0] = 100.0  # the system token is neither V nor T: ignored (the code's [0, 576) window would read it)
    a[0, 1:5, 1:5] = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2], [0.5, 0.5, 0.5, 0.5], [1.5, 1.5, 1.5, 1.5]])
    a[0, 1:5, 5:7] = torch.tensor([[0.0, 0.0], [8.0, 8.0], [0.0, 0.0], [1.0, 2.0]])
    # S = 0.6 * sum_V - 0.4 * mean_T = [2.4, 4.8 - 3.2, 1.2, 3.6 - 0.6] = [2.4, 1.6, 1.2, 3.0]: top-2 = v3, v0
    pruner = built("ficoco-l", llava15(), budget=64)
    out = llm_step(llm_state(a, torch.randn(1, 7, 4)), 2, pruner)
    assert out.origin[0].tolist() == [0, 2, 3, 5, 6]


def test_llm_correlate_mixes_direct_and_text_paths():
    a = torch.zeros(1, 7, 7)
    a[0, 1, 1:5] = torch.tensor([50.0, 1.0, 0.0, -1.0])  # v0 is the clear source (S = 0.6 * 50)
    a[0, 1, 5] = 1.0  # v0 -> t0
    a[0, 5, 1:5] = torch.tensor([0.0, 0.0, 2.0, 0.0])  # t0 -> v2
    hidden = torch.randn(1, 7, 4)
    # C[v0, v1] = g * 1 + (1 - g) * 0, C[v0, v2] = g * 0 + (1 - g) * 2: gamma 0.6 -> v2 (0.8 > 0.6), 0.9 -> v1
    for gamma, target in ((0.6, 3), (0.9, 2)):
        pruner = built("ficoco-l", llava15(), budget=64, gamma=gamma)
        out = llm_step(llm_state(a, hidden), 1, pruner)
        assert out.origin[0].tolist() == [0, 2, 3, 4, 5, 6]
        merged = out.hidden[0, out.origin[0].tolist().index(target)]
        assert torch.allclose(merged, (hidden[0, target] + hidden[0, 1]) / 2, atol=1e-6)
    official = built("ficoco-l", llava15(), budget=64, compress="official")
    out = llm_step(llm_state(a, hidden), 1, official)
    assert torch.allclose(out.hidden[0, 2], hidden[0, 3] + hidden[0, 1], atol=1e-6)


# ---------------------------------------------------------------- schedules and arguments


def test_layer_schedules_and_budgets_on_llava15():
    v = built("ficoco-v", llava15(), budget=64)
    assert v.vision_layers == tuple(range(12, 23)) and sum(v.vision_schedule.values()) == 512
    assert max(v.vision_schedule.values()) - min(v.vision_schedule.values()) <= 1
    assert built("ficoco-v", llava15()).budget == 576 - 11 * 42  # README r = 42 -> 114
    lp = built("ficoco-l", llava15(), budget=192)
    assert lp.llm_layers == tuple(range(5, 31)) and sum(lp.llm_schedule.values()) == 384
    assert built("ficoco-l", llava15()).budget == 576 - 26 * 14  # r = 14 in layers 5..30
    vl = built("ficoco-vl", llava15(), budget=128)
    assert sum(vl.vision_schedule.values()) == 224 and sum(vl.llm_schedule.values()) == 224
    assert (vl.vision_hook_point, vl.llm_hook_point) == ("attn", "attn")
    assert v.renumber_positions and lp.renumber_positions and vl.renumber_positions
    assert Pruner.llm_hook_point == "block" and v.llm_hook_point == "block"


def test_tiny_model_schedules_are_scaled_and_clipped():
    tiny = llava15(visual_tokens=64, grid=(8, 8), vision_layers=3, vision_feature_layer=2, llm_layers=4)
    assert built("ficoco-v", tiny, budget=32).vision_schedule == {1: 32}  # 12..23 -> 2; below feature 2 -> 1
    assert built("ficoco-l", tiny, budget=32).llm_schedule == {1: 16, 2: 16}  # 5..31 -> 1..3, clipped to 0..2
    vl = built("ficoco-vl", tiny, budget=63, vision_share=1.0)
    assert vl.llm_schedule == {} and vl.llm_layers == ()  # the runtime renumbers at the LLM input


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("ficoco-v", {"budget": 64, "r": 8}, "not both"),
        ("ficoco-v", {"r": 0}, r"r \(tokens merged per layer\) must be an int"),
        ("ficoco-v", {"lam": 1.5}, r"lam .* must be a number in \[0, 1\]"),
        ("ficoco-v", {"epsilon": 1.0}, r"epsilon .* must be a number in \(0, 1\)"),
        ("ficoco-v", {"window": 0}, "window"),
        ("ficoco-v", {"penalty_scale": 0.5}, "penalty_scale must be a number >= 1"),
        ("ficoco-v", {"redundancy": "col"}, r"redundancy must be one of \('row', 'column'\)"),
        ("ficoco-v", {"targets": "all"}, r"targets must be one of \('kept', 'any'\)"),
        ("ficoco-v", {"cls_order": "bug"}, "cls_order must be one of"),
        ("ficoco-v", {"start_layer": 24}, r"start layer .* 0\.\.23"),
        ("ficoco-l", {"beta": -0.1}, "beta"),
        ("ficoco-l", {"gamma": "0.6"}, "gamma"),
        ("ficoco-l", {"compress": "sum"}, r"compress must be one of \('paper', 'official'\)"),
        ("ficoco-l", {"start_layer": 32}, r"0\.\.31"),
        ("ficoco-vl", {"budget": 64, "r_llm": 4}, "not both"),
        ("ficoco-vl", {"vision_share": 2}, "vision_share"),
    ],
)
def test_arguments_are_validated(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build(name, **kwargs)


def test_models_it_cannot_serve_are_rejected_in_setup():
    with pytest.raises(ValueError, match="no CLS token"):
        built("ficoco-v", llava15(has_cls=False), budget=64)
    with pytest.raises(ValueError, match="allowed: at least 2"):
        built("ficoco-l", llava15(llm_layers=1), budget=64)
    with pytest.raises(ValueError, match=r"budget 1 keeps no patch token .* allowed 2\.\.577"):
        built("ficoco-v", llava15(visual_tokens=577), budget=1)  # 'full' features: CLS is an image token


# ---------------------------------------------------------------- runtime: the LLM "attn" hook point


class AtAttention(Pruner):
    """Test pruner at the "attn" point of LLM layer 1: keep everything (a new state) or drop half the image."""

    name = "test-attn-point"
    stages = frozenset({Stage.LLM_LAYER})
    llm_hook_point = "attn"

    def __init__(self, drop: bool = False, point: str = "attn") -> None:
        super().__init__()
        self.llm_layers, self.drop, self.llm_hook_point = (1,), drop, point

    def llm_layer(self, state):
        drop = state.visual & (state.origin % 2 == 0) if self.drop else torch.zeros_like(state.valid)
        keep = state.valid & ~drop
        return state.keep(compact_index(keep))


def test_attn_point_hook_that_keeps_everything_reproduces_unpruned_logits(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits
        with pruners.attach(tiny_llava, AtAttention()):
            out = tiny_llava(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ref - out)[real].abs().max() <= 1e-5


def test_attn_point_cache_keeps_what_the_layer_saw(tiny_llava):
    inputs = make_inputs(tiny_llava, [5])
    length = inputs["input_ids"].shape[1]
    logits = {}
    for point in ("attn", "block"):
        with torch.no_grad(), pruners.attach(tiny_llava, AtAttention(drop=True, point=point)):
            out = tiny_llava(**inputs, use_cache=True)
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [length, length] + [length - 32] * 2
        logits[point] = out.logits[:, -1]
    # a pure drop commutes with the per-token MLP, so both points agree
    assert (logits["attn"] - logits["block"]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="llm_hook_point 'mlp' is not supported; allowed: block, attn"):
        with pruners.attach(tiny_llava, AtAttention(point="mlp")):
            pass


# ---------------------------------------------------------------- end to end on the tiny model


def generate(model, inputs, pruner=None, n=4):
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, -n:], None
        with pruners.attach(model, pruner) as report:
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, -n:]
    return out, report.as_dict()


@pytest.mark.parametrize(
    "name, kwargs",
    [(name, {}) for name in NAMES]
    + [
        ("ficoco-v", {"targets": "any", "cls_order": "official"}),
        ("ficoco-l", {"targets": "any", "compress": "official"}),
        ("ficoco-vl", {"cls_order": "official", "compress": "official", "vision_share": 0.25}),
    ],
)
def test_budget_is_met_and_batched_equals_one_by_one(tiny_llava, name, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched, stats = generate(tiny_llava, inputs, pruners.build(name, budget=32, **kwargs))
    assert stats["visual_tokens"] == 32
    for i in range(2):
        alone, _ = generate(tiny_llava, slice_inputs(inputs, i), pruners.build(name, budget=32, **kwargs))
        assert torch.equal(batched[i], alone[0]), f"{name}: sample {i} differs when batched"


@pytest.mark.parametrize("name", NAMES)
def test_keep_everything_matches_unpruned_and_model_is_restored(name):
    model = make_llava(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs(model, [4, 6])
    ref, _ = generate(model, inputs)
    assert torch.equal(generate(model, inputs, pruners.build(name, budget=64))[0], ref)
    pruned, stats = generate(model, inputs, pruners.build(name, budget=32))
    assert stats["visual_tokens"] == 32
    assert "forward" not in vars(model.model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(generate(model, inputs)[0], ref)


def test_two_images_per_sample_and_constant_r_mode(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8], images_per_sample=2)
    for name in NAMES:
        batched, stats = generate(tiny_llava, inputs, pruners.build(name, budget=16))
        assert stats["visual_tokens"] == 32  # budget per image
        alone, _ = generate(tiny_llava, slice_inputs(inputs, 1, images_per_sample=2), pruners.build(name, budget=16))
        assert torch.equal(batched[1], alone[0])
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3]), pruners.build("ficoco-l", r=10))
    assert stats["visual_tokens"] == 64 - 2 * 10
