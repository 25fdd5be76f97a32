"""DART (arXiv 2502.11494): pivots, least-duplicated retention on known answers, the official loop, end to end."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import generate_new_tokens, llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import pruners
import pruners.methods.dart  # noqa: F401  (registers "dart" until the methods package imports it)
from pruners.base import Stage, TokenState
from pruners.methods.dart import set_order

built = functools.partial(setup_pruner, "dart")
NEW_TOKENS = 5


def tiny_info(visual_tokens: int, llm_layers: int = 4):
    return llava15_info(visual_tokens=visual_tokens, grid=(1, visual_tokens), llm_layers=llm_layers)


def llm_state(hidden: torch.Tensor, visual: torch.Tensor, scores: torch.Tensor, valid=None, images=None) -> TokenState:
    """LLM_LAYER state whose keys have L1 norm `scores` (one kv head, head_dim 1)."""
    bsz, n, _ = hidden.shape
    valid = torch.ones(bsz, n, dtype=torch.bool) if valid is None else valid
    slots = torch.arange(n).expand(bsz, n)
    first = (~valid).sum(-1, keepdim=True)
    return TokenState(
        hidden=hidden,
        valid=valid,
        visual=visual & valid,
        positions=(slots - first).clamp(min=0),
        origin=torch.where(valid, slots, -1),
        sizes=torch.ones(bsz, n),
        stage=Stage.LLM_LAYER,
        layer=0,
        num_images=torch.ones(bsz, dtype=torch.long) if images is None else images,
        extras={"keys": scores.float().view(bsz, 1, n, 1)},
    )


def layout(prefix: int, n_visual: int, suffix: int) -> torch.Tensor:
    """(1, L) visual mask: `prefix` text tokens, the image, `suffix` text tokens."""
    return torch.tensor([[False] * prefix + [True] * n_visual + [False] * suffix])


def kept_visual(out: TokenState, row: int = 0) -> list[int]:
    """Input slots (origins) of the visual tokens kept in sample `row`."""
    return sorted(out.origin[row][out.visual[row] & out.valid[row]].tolist())


# ---------------------------------------------------------------- pivots


def test_image_pivots_are_the_largest_key_norms():
    visual = layout(2, 16, 3)
    scores = torch.ones(1, 21)
    top = [2 + 5, 2 + 9, 2 + 2, 2 + 14]  # visual tokens 5, 9, 2, 14
    for rank, slot in enumerate(top):
        scores[0, slot] = 10.0 - rank
    scores[0, 0] = 50.0  # a system-prompt token never counts as an image pivot
    state = llm_state(torch.randn(1, 21, 8), visual, scores)
    pruner = built(tiny_info(16), budget=4, features="hidden")  # budget <= image pivots: pivots only
    assert kept_visual(pruner.llm_layer(state)) == sorted(top)
    pruner = built(tiny_info(16), budget=2, features="hidden")  # the 2 best of them
    assert kept_visual(pruner.llm_layer(state)) == sorted(top[:2])


def test_hidden_norm_criterion_picks_the_largest_hidden_states():
    visual = layout(1, 8, 2)
    hidden = torch.randn(1, 11, 6)
    hidden[0, 1 + 3] *= 100
    state = llm_state(hidden, visual, torch.ones(1, 11))
    pruner = built(tiny_info(8), budget=1, criterion="hidden_norm", features="hidden")
    assert kept_visual(pruner.llm_layer(state)) == [1 + 3]


def test_text_pivots_are_the_best_text_tokens_after_the_image():
    visual = layout(3, 6, 5)
    scores = torch.ones(1, 14)
    scores[0, 0] = 99.0  # before the image: not a text pivot candidate
    scores[0, 9 + 2], scores[0, 9 + 4] = 7.0, 6.0
    scores[0, 3] = 5.0  # image pivot
    state = llm_state(torch.randn(1, 14, 4), visual, scores)
    pruner = built(tiny_info(6), budget=3, text_pivots=2)
    assert pruner.text_pivot_slots(state, pruner.scores(state)).tolist() == [[11, 13]]


# ---------------------------------------------------------------- retention: the least duplicated


def test_one_pivot_drops_exactly_its_nearest_tokens():
    torch.manual_seed(0)
    n, d = 24, 16
    visual = layout(2, n, 3)
    hidden = torch.randn(1, n + 5, d)
    scores = torch.ones(1, n + 5)
    scores[0, 2 + 7] = 10.0  # the pivot: visual token 7
    state = llm_state(hidden, visual, scores)
    feats = hidden[0, 2 : 2 + n]
    cos = torch.nn.functional.cosine_similarity(feats, feats[7][None], dim=-1)
    for budget in (1, 5, 12, 23, 24):
        pruner = built(tiny_info(n), budget=budget, image_pivots=1, text_pivots=0, features="hidden")
        kept = kept_visual(pruner.llm_layer(state))
        others = [i for i in cos.argsort().tolist() if i != 7]  # least similar first
        assert kept == sorted(2 + i for i in [7] + others[: budget - 1])
        dropped = set(range(2, 2 + n)) - set(kept)
        assert dropped == {2 + i for i in others[budget - 1 :]}  # the most duplicated of the pivot


def test_known_duplicates_of_every_pivot_are_the_tokens_dropped():
    # Two image pivots (e0, e1) and a text pivot (e2). Visual tokens: 3 near-copies of each image
    # pivot, 2 near-copies of the text pivot, 6 distinct tokens pointing away from all three.
    d = 12
    eye = torch.eye(d)
    rows = [eye[0], eye[1]]  # the image pivots, visual tokens 0 and 1
    copies = [eye[p] + 0.01 * eye[5 + j] for p in (0, 1, 2) for j in range(3)][:8]  # 3 + 3 + 2 copies
    distinct = [-(eye[0] + eye[1] + eye[2]) + 2 * eye[3 + j] for j in range(6)]
    rows += copies[:3] + distinct[:3] + copies[3:] + distinct[3:]
    n = len(rows)  # 2 + 8 + 6 = 16
    hidden = torch.stack([eye[4]] + rows + [eye[2], eye[3]])[None]  # 1 prefix, image, 2 suffix
    visual = layout(1, n, 2)
    scores = torch.ones(1, n + 3)
    scores[0, 1], scores[0, 2] = 9.0, 8.0  # image pivots: visual tokens 0, 1
    scores[0, n + 1] = 5.0  # text pivot: the first suffix token (e2)
    state = llm_state(hidden, visual, scores)
    for order in ("official", "score"):
        pruner = built(tiny_info(n), budget=8, image_pivots=2, text_pivots=1, features="hidden", order=order)
        kept = kept_visual(pruner.llm_layer(state))
        expected = [0, 1] + [2 + 3 + j for j in range(3)] + [2 + 3 + 3 + 5 + j for j in range(3)]
        assert kept == [1 + i for i in expected]  # the pivots and the 6 distinct tokens; every copy dropped


def official_reference(feats, scores, start, length, budget, image_pivots, text_pivots, quotas=None):
    """The official `get_retained_image_token` loop, written out literally (one sample, batch 1)."""
    image = scores[start : start + length].topk(image_pivots).indices + start
    text = scores[start + length :].topk(text_pivots).indices + start + length
    image, text = image.tolist(), text.tolist()
    top_k = budget // (image_pivots + text_pivots)
    chosen = set(image + text)
    free = set(range(start, start + length)) - set(image)
    for step, item in enumerate(list(set(image + text))):
        pool = sorted(free)
        sim = -torch.nn.functional.cosine_similarity(feats[item][None], feats[pool], dim=-1)
        take = top_k if quotas is None else quotas[step]
        picked = [pool[i] for i in sim.topk(take).indices.tolist()]
        chosen.update(picked)
        free -= set(picked)
    return sorted(chosen - set(text))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_count_matches_the_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    start, n, suffix = 35, 48, 9
    length = start + n + suffix
    hidden = torch.randn(1, length, 16, generator=g)
    scores = torch.rand(1, length, generator=g)
    state = llm_state(hidden, layout(start, n, suffix), scores)
    pruner = built(tiny_info(n), budget=16, count="official", features="hidden")
    kept = kept_visual(pruner.llm_layer(state))
    assert kept == official_reference(hidden[0], scores[0], start, n, 16, 4, 4)
    assert len(kept) == pruner.official_count(16) == 4 + 8 * 2


@pytest.mark.parametrize("budget", [5, 13, 21, 30])
def test_exact_count_spreads_the_remainder_over_the_first_pivots_visited(budget):
    g = torch.Generator().manual_seed(budget)
    start, n, suffix = 35, 48, 9
    hidden = torch.randn(1, start + n + suffix, 16, generator=g)
    scores = torch.rand(1, start + n + suffix, generator=g)
    state = llm_state(hidden, layout(start, n, suffix), scores)
    pruner = built(tiny_info(n), budget=budget, features="hidden")
    kept = kept_visual(pruner.llm_layer(state))
    share = budget - 4
    quotas = [share // 8 + (step < share % 8) for step in range(8)]
    assert len(kept) == budget
    assert kept == official_reference(hidden[0], scores[0], start, n, budget, 4, 4, quotas)


def test_set_order_is_the_python_set_iteration_order():
    keys = [611, 40, 8, 72, 35, 620, 615, 612]  # 40, 8 and 72 collide modulo 32
    assert [keys[i] for i in set_order(keys)] == list(set(keys))
    assert sorted(set_order(keys)) == list(range(8))


def test_visit_order_changes_which_pivot_claims_a_shared_token():
    # Two image pivots equally far from the free tokens except one each: who is visited first decides.
    visual = layout(0, 5, 1)
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [0.1, -1.0], [0.7, 0.7], [0.0, 0.0]]])
    scores = torch.tensor([[2.0, 3.0, 0.0, 0.0, 0.0, 0.0]])  # pivot 1 (score 3) before pivot 0
    state = llm_state(hidden, visual, scores)
    kw = dict(budget=3, image_pivots=2, text_pivots=0, features="hidden")
    # Budget 3 = 2 pivots + 1 token, taken by the pivot visited first.
    # "score" visits token 1 (higher score) first; its least similar token is (0.1, -1), token 3.
    assert kept_visual(built(tiny_info(5), order="score", **kw).llm_layer(state)) == [0, 1, 3]
    # "official": set([1, 0]) iterates 0 first; token 0's least similar is (-1, 0.1), token 2.
    assert list(set([1, 0])) == [0, 1]
    assert kept_visual(built(tiny_info(5), order="official", **kw).llm_layer(state)) == [0, 1, 2]


def test_normed_features_use_the_final_norm_when_the_runtime_offers_it():
    # Pivot p = (1, 1); t1 = (1, -0.3), t2 = (0, 1). Raw cosine: t1 is less similar (0.47 < 0.71).
    # After a norm with weight (10, 1): cos(w p, w t1) = 0.99, cos(w p, w t2) = 0.10: t2 is kept.
    hidden = torch.tensor([[[1.0, 1.0], [1.0, -0.3], [0.0, 1.0], [0.5, 0.5]]])
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    state = llm_state(hidden, layout(0, 3, 1), scores)
    kw = dict(budget=2, image_pivots=1, text_pivots=0)
    assert kept_visual(built(tiny_info(3), features="hidden", **kw).llm_layer(state)) == [0, 1]
    state.extras["final_norm"] = lambda x: x * torch.tensor([10.0, 1.0]) / x.pow(2).mean(-1, keepdim=True).sqrt()
    assert kept_visual(built(tiny_info(3), features="normed", **kw).llm_layer(state)) == [0, 2]


# ---------------------------------------------------------------- images, batches


def test_each_image_keeps_its_own_budget_and_pivots():
    g = torch.Generator().manual_seed(3)
    n = 10
    visual = torch.tensor([[False] + [True] * (2 * n) + [False] * 3])
    scores = torch.rand(1, 2 * n + 4, generator=g)
    scores[0, 1 : 1 + n] += 5  # every image pivot would come from image 0 if the images were one set
    hidden = torch.randn(1, 2 * n + 4, 8, generator=g)
    state = llm_state(hidden, visual, scores, images=torch.tensor([2]))
    kept = kept_visual(built(tiny_info(n), budget=6, features="hidden").llm_layer(state))
    assert len([s for s in kept if s <= n]) == 6 and len([s for s in kept if s > n]) == 6
    image_1 = scores[0, 1 + n : 1 + 2 * n].topk(4).indices + 1 + n
    assert set(image_1.tolist()) <= set(kept)
    joint = kept_visual(built(tiny_info(n), budget=6, features="hidden", segment="sample").llm_layer(state))
    assert len(joint) == 12 and set((scores[0, 1 : 1 + n].topk(4).indices + 1).tolist()) <= set(joint)


def test_batched_state_equals_one_by_one():
    g = torch.Generator().manual_seed(5)
    n, d = 12, 8
    lengths = [(2, 3), (2, 7)]  # (prefix, suffix) text lengths: sample 0 is left-padded by 4
    width = max(p + n + s for p, s in lengths)
    hidden = torch.zeros(2, width, d)
    valid = torch.zeros(2, width, dtype=torch.bool)
    visual = torch.zeros(2, width, dtype=torch.bool)
    scores = torch.zeros(2, width)
    alone = []
    for b, (p, s) in enumerate(lengths):
        length = p + n + s
        h, sc = torch.randn(1, length, d, generator=g), torch.rand(1, length, generator=g)
        hidden[b, width - length :], scores[b, width - length :] = h[0], sc[0]
        valid[b, width - length :] = True
        visual[b, width - length + p : width - length + p + n] = True
        pruner = built(tiny_info(n), budget=7, features="hidden")
        out = pruner.llm_layer(llm_state(h, layout(p, n, s), sc))
        alone.append([width - length + i for i in kept_visual(out)])
    out = built(tiny_info(n), budget=7, features="hidden").llm_layer(llm_state(hidden, visual, scores, valid))
    assert [kept_visual(out, b) for b in range(2)] == alone


# ---------------------------------------------------------------- arguments and setup


def test_layer_and_budget_defaults_for_llava15():
    pruner = built(llava15_info())
    assert pruner.llm_layers == (1,) and pruner.budget == 128  # K = 2; 576 * (1 - 0.778) = 127.9
    for budget in (64, 128, 192):
        assert built(llava15_info(), budget=budget).budget == budget
    assert built(llava15_info(), budget=128, count="official").official_count(128) == 132
    assert built(llava15_info(llm_layers=4)).llm_layers == (0,)  # scale_layers: 1 of 32 -> 0 of 4
    assert built(llava15_info(llm_layers=40)).llm_layers == (1,)
    assert built(llava15_info(llm_layers=4), k=31).llm_layers == (2,)  # clipped: a cut needs a later layer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, r"k .* 1\.\.31, got 0"),
        ({"k": 32}, r"k .* 1\.\.31, got 32"),
        ({"ratio": 1.0}, r"ratio .* \[0, 1\), got 1.0"),
        ({"image_pivots": 0}, r"image_pivots must be an int >= 1, got 0"),
        ({"text_pivots": -1}, r"text_pivots must be an int >= 0, got -1"),
        ({"criterion": "v_norm"}, r"criterion must be one of \('k_norm', 'hidden_norm'\), got 'v_norm'"),
        ({"features": "raw"}, r"features must be one of"),
        ({"order": "random"}, r"order must be one of"),
        ({"segment": "crop"}, r"segment must be one of"),
        ({"count": "paper"}, r"count must be one of"),
        ({"budget": 0}, r"budget must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("dart", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match=r"budget 577 is out of range.*allowed 1..576"):
        built(llava15_info(), budget=577)
    with pytest.raises(ValueError, match=r"decoder has 1 layer\(s\); allowed: at least 2"):
        built(llava15_info(llm_layers=1))
    with pytest.raises(ValueError, match=r"keeps 68 tokens for budget 64, more than the 64.*allowed budget 1..63"):
        built(tiny_info(64), budget=64, count="official")


# ---------------------------------------------------------------- end to end on the tiny model


generate = functools.partial(generate_new_tokens, new_tokens=NEW_TOKENS)


@pytest.mark.parametrize(
    "kwargs",
    [{"budget": 32}, {"budget": 13, "order": "score"}, {"budget": 20, "criterion": "hidden_norm", "count": "official"}],
)
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, pruners.build("dart", **kwargs))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("dart", **kwargs))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


@pytest.mark.parametrize("budget", [1, 4, 5, 32, 63])
def test_budget_is_met_exactly_on_sdpa(tiny_llava, budget):
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build("dart", budget=budget), report=True)
    assert stats["visual_tokens"] == budget
    assert stats["visual_tokens_per_layer"] == [64, budget, budget, budget]  # the cut after layer 0 of 4
    assert tiny_llava.config.text_config._attn_implementation == "sdpa"


def test_official_count_is_reported(tiny_llava):
    # 9 text tokens after the image, so all 4 text pivots exist (the official code needs them).
    _, stats = generate(
        tiny_llava, make_inputs(tiny_llava, [9]), pruners.build("dart", budget=32, count="official"), report=True
    )
    assert stats["visual_tokens"] == 4 + 8 * 4


@pytest.mark.parametrize("segment", ["image", "sample"])
def test_two_images_per_sample(segment):
    model = make_llava(seed=2)
    inputs = make_inputs(model, [3, 6], images_per_sample=2)
    pruner = pruners.build("dart", budget=10, segment=segment)
    _, stats = generate(model, inputs, pruner, report=True)
    assert stats["visual_tokens"] == 20
    alone = generate(
        model, slice_inputs(inputs, 1, images_per_sample=2), pruners.build("dart", budget=10, segment=segment)
    )
    assert torch.equal(generate(model, inputs, pruners.build("dart", budget=10, segment=segment))[1], alone[0])


def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    assert torch.equal(generate(tiny_llava, inputs, pruners.build("dart", budget=64)), generate(tiny_llava, inputs))
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits[:, -1]
        with pruners.attach(tiny_llava, pruners.build("dart", budget=64)):
            out = tiny_llava(**inputs).logits[:, -1]
    assert (ref - out).abs().max() <= 1e-5


def test_pivots_are_the_largest_post_rope_key_norms_of_the_layer(tiny_llava):
    """budget = 4 keeps just the image pivots: the 4 image tokens whose layer-0 keys (with RoPE,
    all heads) have the largest L1 norm, recomputed here from the unpruned model."""
    inputs = slice_inputs(make_inputs(tiny_llava, [6]), 0)
    lm = tiny_llava.model.language_model
    with torch.no_grad():
        h0 = tiny_llava(**inputs, output_hidden_states=True).hidden_states[0]
        attn, n = lm.layers[0].self_attn, h0.shape[1]
        k = attn.k_proj(lm.layers[0].input_layernorm(h0)).view(1, n, -1, attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(h0, torch.arange(n)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        expected = k.abs().sum((1, 3))[0, 2 : 2 + 64].topk(4).indices.sort().values + 2  # image slots 2..65
        seen = {}
        pruner = pruners.build("dart", budget=4)
        cut = pruner.llm_layer
        pruner.llm_layer = lambda state: seen.setdefault("out", cut(state))
        with pruners.attach(tiny_llava, pruner):
            tiny_llava(**inputs)
    out = seen["out"]
    assert out.origin[0][out.visual[0] & out.valid[0]].tolist() == expected.tolist()
