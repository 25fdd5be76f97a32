"""TokenCarve (METHODS.md §4): IPGS scores, the 1.5 T prune + merge to T, the KV-cache cut, arguments."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs

import pruners
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.tokencarve import carve_counts

PRE, POST = 2, 3  # text tokens before and after the image tokens


def info(visual_tokens: int = 576, llm_layers: int = 32) -> ModelInfo:
    return llava15_info(visual_tokens=visual_tokens, llm_layers=llm_layers)


built = functools.partial(setup_pruner, "tokencarve")


def llm_state(visual: list[torch.Tensor], av: list[torch.Tensor], images: list[int]) -> TokenState:
    """LLM_LAYER state, one row per sample: left padding, PRE text, the visual tokens, POST text.

    The probe returns, for the last slot, a row holding `av` on the visual columns (0.5 on text);
    any other query row is an error (TokenCarve reads the last prompt token only).
    """
    dim = visual[0].shape[1]
    lengths = [PRE + v.shape[0] + POST for v in visual]
    width = max(lengths)
    bsz = len(visual)
    hidden = torch.zeros(bsz, width, dim)
    valid = torch.zeros(bsz, width, dtype=torch.bool)
    is_visual = torch.zeros(bsz, width, dtype=torch.bool)
    row = torch.zeros(bsz, width)
    for b, (v, a, n) in enumerate(zip(visual, av, lengths)):
        start = width - n
        # Text states depend on the sample only (not on its row), so a sample alone equals batched.
        hidden[b, start:] = torch.randn(n, dim, generator=torch.Generator().manual_seed(n))
        hidden[b, start + PRE : start + PRE + v.shape[0]] = v
        valid[b, start:] = True
        is_visual[b, start + PRE : start + PRE + v.shape[0]] = True
        row[b, start:] = 0.5
        row[b, start + PRE : start + PRE + v.shape[0]] = a
    positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)

    def probe(query_index, heads="mean", logits=False):
        assert (query_index == width - 1).all() and heads == "mean" and not logits
        return row[:, None, :]

    return TokenState(
        hidden=hidden,
        valid=valid,
        visual=is_visual,
        positions=positions,
        origin=torch.arange(width).expand(bsz, width),
        sizes=torch.ones(bsz, width),
        stage=Stage.LLM_LAYER,
        layer=1,
        num_images=torch.tensor(images),
        probe=probe,
    )


def visual_origins(state: TokenState) -> list[int]:
    """Indices (among the image's tokens) of the visual tokens a one-sample state holds."""
    keep = state.visual[0] & state.valid[0]
    return (state.origin[0][keep] - PRE).tolist()


# ---------------------------------------------------------------- IPGS (filter)


def information_example() -> tuple[torch.Tensor, torch.Tensor]:
    """10 visual tokens in R^6: v0..v5 all along e0 (norms 1 .. 2.25: one direction, rank 1);
    v6..v9 of norm 3 in span(e1..e4), not orthogonal to each other (rank 4). The attention is
    adversarial: it favours the redundant v0..v5."""
    x = np.zeros((10, 6))
    x[:6, 0] = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    x[6:, 1:5] = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 2]]
    x[6:] *= 3 / np.linalg.norm(x[6:], axis=1, keepdims=True)
    av = torch.tensor([0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.01, 0.02, 0.03, 0.04])
    return torch.tensor(x, dtype=torch.float32), av


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_information_score_is_l1_norm_of_x_v(solver):
    x, av = information_example()
    state = llm_state([x], [av], [1])
    pruner = built(info(10, 4), budget=4, solver=solver)
    index = torch.arange(PRE, PRE + 10)[None]
    sv = pruner.sv_scores(state, index)[0].numpy()
    _, _, vt = np.linalg.svd(x.double().numpy())  # independent: numpy, float64, full V
    want = np.abs(x.double().numpy() @ vt.T).sum(1)
    np.testing.assert_allclose(sv, want, rtol=1e-5)
    # Tokens along a principal axis score their norm; mixed ones score above it (L1 >= L2).
    np.testing.assert_allclose(sv[:6], [1.0, 1.25, 1.5, 1.75, 2.0, 2.25], rtol=1e-5)
    assert (sv[6:] > 3).all() and list(np.argsort(-sv)[:4]) == [8, 6, 9, 7]


def test_borda_fusion_ranks_as_hand_computed():
    x, av = information_example()
    state = llm_state([x], [av], [1])
    index = torch.arange(PRE, PRE + 10)[None]
    # rank_AV: v0..v5 -> 0..5, v9 6, v8 7, v7 8, v6 9; rank_SV: v8 0, v6 1, v9 2, v7 3, v5..v0 -> 4..9.
    # IPGS = 0.5 (10 - rank_AV) + 0.5 (10 - rank_SV): v0..v5 all 10 - 9/2 = 5.5.
    ipgs = built(info(10, 4), budget=4).ipgs_scores(state, index)[0]
    assert ipgs.tolist() == [5.5] * 6 + [5.0, 4.5, 6.5, 6.0]
    assert built(info(10, 4), budget=4, mode="av").ipgs_scores(state, index)[0].tolist() == [
        10,
        9,
        8,
        7,
        6,
        5,
        1,
        2,
        3,
        4,
    ]  # N - rank_AV
    assert built(info(10, 4), budget=4, mode="sv").ipgs_scores(state, index)[0].tolist() == [
        1,
        2,
        3,
        4,
        5,
        6,
        9,
        7,
        10,
        8,
    ]  # N - rank_SV
    weighted = built(info(10, 4), budget=4, weight=0.25).ipgs_scores(state, index)[0]
    assert weighted[8].item() == pytest.approx(0.25 * 3 + 0.75 * 10)


def test_ipgs_keeps_the_set_whose_merged_matrix_keeps_the_most_information():
    x, av = information_example()
    ranks, kept = {}, {}
    for mode in ("av", "ipgs", "sv"):
        state = llm_state([x], [av], [1])
        out = built(info(10, 4), budget=4, mode=mode).llm_layer(state)
        vis = out.hidden[0][out.visual[0] & out.valid[0]]
        assert vis.shape[0] == 4
        ranks[mode] = np.linalg.matrix_rank(vis.double().numpy(), tol=1e-6)
        kept[mode] = visual_origins(out)
    # Attention alone keeps only copies of e0; IPGS adds the two most informative tokens v8, v9.
    assert ranks == {"av": 1, "ipgs": 3, "sv": 4}
    # IPGS order v8, v9, v0, v1, .., v5, v6, v7; Stage I keeps 6: A = v8, v9, v0 and B = v1, v2, v3.
    # Every B token matches v0 with cosine 1: v1 and v2 (higher IPGS first) merge into v0, v3 stays.
    assert kept["ipgs"] == [0, 3, 8, 9]
    state = llm_state([x], [av], [1])
    out = built(info(10, 4), budget=4).llm_layer(state)
    assert torch.allclose(out.hidden[0, PRE], x[:3].mean(0))


def test_sv_mode_reads_no_attention():
    x, av = information_example()
    state = llm_state([x], [av], [1]).replace(probe=None)
    out = built(info(10, 4), budget=4, mode="sv").llm_layer(state)
    assert (out.visual & out.valid).sum().item() == 4


# ---------------------------------------------------------------- Stage I + II (prune, merge)


def merge_example() -> tuple[torch.Tensor, torch.Tensor]:
    """8 visual tokens; attention order v1, v3, v6, v4, v7, v0, v2, v5. For T = 4: M = 6 kept,
    A = v1, v3, v6, B = v4, v7, v0; cos(v7, v3) = .95, cos(v4, v3) = .9, cos(v0, v6) = .5."""
    e = torch.eye(8)
    x = torch.stack(
        [
            0.5 * e[3] + 0.75**0.5 * e[5],  # v0
            2 * e[1],  # v1
            e[6],  # v2 (pruned)
            3 * e[2],  # v3
            0.9 * e[2] + 0.19**0.5 * e[4],  # v4
            e[7],  # v5 (pruned)
            e[3],  # v6
            (0.95 * e[2] + 0.0975**0.5 * e[0]) * 1.5,  # v7
        ]
    )
    av = torch.tensor([0.05, 0.30, 0.02, 0.20, 0.10, 0.01, 0.15, 0.08])
    return x, av


def test_merge_is_plain_mean_of_target_and_sources_and_count_is_exact():
    x, av = merge_example()
    state = llm_state([x], [av], [1])
    out = built(info(8, 4), budget=4, mode="av").llm_layer(state)
    assert visual_origins(out) == [0, 1, 3, 6]  # v4 and v7 merged into v3; v2, v5 pruned; v0 stays
    vis = out.hidden[0][out.visual[0]]
    assert torch.allclose(vis[2], (x[3] + x[4] + x[7]) / 3)  # plain mean, target included
    assert torch.equal(vis[[0, 1, 3]], x[[0, 1, 6]])  # the others untouched
    assert out.sizes[0][out.visual[0]].tolist() == [1.0, 1.0, 3.0, 1.0]
    # The merged token keeps the target's position id; text tokens and their order are unchanged.
    assert out.positions[0].tolist() == [0, 1, 2, 3, 5, 8, 10, 11, 12]
    assert torch.equal(out.hidden[0, [0, 1, -3, -2, -1]], state.hidden[0, [0, 1, -3, -2, -1]])


def test_counts_round_down_and_cap_at_the_visual_tokens():
    # T -> (T, M, m): M = floor(1.5 T) (official int(T / 2 * 3)), m = M - T = floor(T / 2).
    t, m_keep, m_merge = carve_counts(torch.tensor([576] * 4), torch.tensor([64, 128, 192, 3]))
    assert (m_keep.tolist(), m_merge.tolist()) == ([96, 192, 288, 4], [32, 64, 96, 1])
    # 1.5 T above N: M = N, m = N - T; T above N: T = M = N.
    t, m_keep, m_merge = carve_counts(torch.tensor([8, 8, 8]), torch.tensor([6, 7, 9]))
    assert (t.tolist(), m_keep.tolist(), m_merge.tolist()) == ([6, 7, 8], [8, 8, 8], [2, 1, 0])
    x, av = merge_example()
    for budget in range(1, 9):
        state = llm_state([x], [av], [1])
        out = built(info(8, 4), budget=budget).llm_layer(state)
        assert (out.visual & out.valid).sum().item() == budget
        assert (out.valid & ~out.visual).sum().item() == PRE + POST
        if budget == 8:
            assert out is state  # keep everything: no cut at all


def test_several_images_and_batched_equals_one_by_one():
    x, av = merge_example()
    g = torch.Generator().manual_seed(3)
    y, bv = torch.randn(12, 8, generator=g), torch.rand(12, generator=g)
    # Sample 0: one image of 8; sample 1: two images of 6 (budget 3 each -> 6 kept of 12).
    pruner = built(info(8, 4), budget=3)
    batched = pruner.llm_layer(llm_state([x, y], [av, bv], [1, 2]))
    assert (batched.visual & batched.valid).sum(-1).tolist() == [3, 6]
    for b, (v, a, n) in enumerate([(x, av, 1), (y, bv, 2)]):
        alone = pruner.llm_layer(llm_state([v], [a], [n]))
        keep = batched.valid[b]
        shift = batched.origin[b][keep][0] - alone.origin[0][alone.valid[0]][0]
        assert torch.equal(batched.origin[b][keep] - shift, alone.origin[0][alone.valid[0]])
        assert torch.allclose(batched.hidden[b][keep], alone.hidden[0][alone.valid[0]], atol=1e-6)


# ---------------------------------------------------------------- end to end on the tiny model


def generate(model, inputs, pruner=None, new: int = 5):
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, -new:]
        with pruners.attach(model, pruner):
            return model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, -new:]


def test_end_to_end_budget_batching_and_keep_all(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    pruner = pruners.build("tokencarve", budget=32)
    with torch.no_grad(), pruners.attach(tiny_llava, pruner) as report:
        batched = tiny_llava.generate(**inputs, max_new_tokens=5, do_sample=False)[:, -5:]
    assert pruner.llm_layers == (1,)
    stats = report.as_dict()
    assert stats["visual_tokens"] == 32
    assert stats["kv_cache_bytes"] < stats["kv_cache_bytes_prefill"]  # layers 0-1 cut at decoding
    for i in range(2):
        assert torch.equal(
            generate(tiny_llava, slice_inputs(inputs, i), pruners.build("tokencarve", budget=32))[0], batched[i]
        )
    keep_all = generate(tiny_llava, inputs, pruners.build("tokencarve", budget=64))
    assert torch.equal(keep_all, generate(tiny_llava, inputs))


def test_two_images_per_sample_keep_budget_each():
    model = make_llava(seed=1)
    inputs = make_inputs(model, [4, 7], images_per_sample=2)
    with torch.no_grad(), pruners.attach(model, pruners.build("tokencarve", budget=16)) as report:
        model(**inputs)
    assert report.as_dict()["visual_tokens"] == 32  # 16 per image, two images


def test_early_layer_caches_hold_only_surviving_visual_entries():
    model = make_llava(seed=4)
    inputs = make_inputs(model, [6, 2])  # sample 0 is the longest: no padding
    length = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(-1).tolist()
    pruner = pruners.build("tokencarve", budget=16)
    seen = {}
    decode = pruner.decode

    def spy(cache):  # record the slots and layer-0 keys right after the pruner's cut at step 0
        decode(cache)
        if cache.step == 0:
            seen["slots"] = [cache.slots(i) for i in range(cache.num_layers)]
            seen["keys0"] = cache.keys(0).clone()

    pruner.decode = spy
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        with pruners.attach(model, pruner):
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    unpruned = [layer.keys.shape[2] for layer in ref.past_key_values.layers]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert unpruned == [length + 3] * 4
    assert lengths == [length - (64 - 16) + 3] * 4  # layers 0-1 as short as the pruned layers 2-3
    slots = seen["slots"]
    for b in range(2):
        surviving = set(slots[-1].origin[b][slots[-1].visual[b]].tolist())
        assert len(surviving) == 16
        for layer in slots:
            assert set(layer.origin[b][layer.visual[b] & layer.valid[b]].tolist()) == surviving
            assert layer.valid[b].sum().item() == real[b] - 48
    # Layer 0's kept entries are the unpruned model's own K at those tokens (a merged token's
    # entry is its target's): layers 0-1 saw every token.
    origin0 = slots[0].origin[0]
    ref_keys0 = ref.past_key_values.layers[0].keys[0][:, :length]
    assert torch.allclose(seen["keys0"][0], ref_keys0[:, origin0], atol=1e-5)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, "budget must be at least 1, got 0"),
        ({"k": 0}, r"k must be an int >= 1 .*got 0"),
        ({"k": 1.5}, r"k must be an int >= 1 .*got 1.5"),
        ({"mode": "mean"}, r"mode must be one of \('ipgs', 'sv', 'av'\), got 'mean'"),
        ({"weight": 1.5}, r"weight .* must be in \[0, 1\], got 1.5"),
        ({"weight": True}, r"weight .* must be in \[0, 1\], got True"),
        ({"solver": "qr"}, r"solver must be one of \('gram', 'svd'\), got 'qr'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("tokencarve", **kwargs)


def test_setup_checks_layers_and_budget_and_defaults():
    with pytest.raises(ValueError, match=r"k=4 must leave at least one layer after the cut: allowed 1..3"):
        built(info(64, 4), k=4)
    with pytest.raises(ValueError, match=r"budget 65 is out of range.*allowed 1..64"):
        built(info(64, 4), budget=65)
    assert built(info()).budget == 64 and built(info(32, 4)).budget == 32
    assert built(info(), k=3).llm_layers == (2,)
