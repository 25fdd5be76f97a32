"""G-Prune (METHODS.md §2): graph propagation on known answers, the kept-token property, end-to-end runs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import llava15_info, make_inputs, setup_pruner, slice_inputs

import pruners
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.gprune import graph_scores


def info(visual_tokens: int = 576) -> ModelInfo:
    side = math.isqrt(visual_tokens)
    return llava15_info(visual_tokens=visual_tokens, grid=(side, visual_tokens // side), vision_feature_layer=22)


built = functools.partial(setup_pruner, "gprune")


def output_state(hidden: torch.Tensor) -> TokenState:
    """VISION_OUTPUT state: (images, N, D) projected features, all visual, positions = patch index."""
    n_img, n, _ = hidden.shape
    patches = torch.arange(n).expand(n_img, n)
    return TokenState(
        hidden=hidden,
        valid=torch.ones(n_img, n, dtype=torch.bool),
        visual=torch.ones(n_img, n, dtype=torch.bool),
        positions=patches,
        origin=patches,
        sizes=torch.ones(n_img, n),
        stage=Stage.VISION_OUTPUT,
        grid=(1, n),
        num_images=torch.ones(n_img, dtype=torch.long),
    )


def reference_scores(features: np.ndarray, similarity: float, temperature: float, iterations: int) -> np.ndarray:
    """METHODS.md §2.1 written out literally in float64 numpy, with the official fills and P^n."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    sim[sim < similarity] = 0
    logits = sim / temperature
    logits[np.abs(logits) < 1e-6] = -5000
    trans = np.exp(logits - logits.max(1, keepdims=True))
    trans /= trans.sum(1, keepdims=True)
    degree = (trans > 0).sum(1)
    arrived = np.linalg.norm(features, axis=1) @ np.linalg.matrix_power(trans, iterations)
    return arrived / degree


# ---------------------------------------------------------------- propagation, known answers


def test_duplicates_share_their_information_closed_form():
    # Tokens 0 and 1 point the same way (cos 1, an edge), token 2 is orthogonal (no edge).
    # P = [[.5, .5, 0], [.5, .5, 0], [0, 0, 1]]; w = (1, 3, 2); deg = (2, 2, 1).
    feats = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    # n = 0: w / deg. n >= 1: the pair pools 1 + 3 and splits it evenly, 2 each, / 2 = 1.
    assert graph_scores(feats, valid, iterations=0).tolist() == [[0.5, 1.5, 2.0]]
    for n in (1, 5):
        assert torch.allclose(graph_scores(feats, valid, iterations=n), torch.tensor([[1.0, 1.0, 2.0]]))


def test_chain_one_step_by_hand():
    # a = 2 e0, b = (.6, .8), c = 3 e1: cos(a, b) = .6, cos(b, c) = .8, cos(a, c) = 0 -> chain a - b - c.
    feats = torch.tensor([[[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]]])
    e = math.exp
    row_a = [e(1), e(0.6), 0.0]
    row_b = [e(0.6), e(1), e(0.8)]
    row_c = [0.0, e(0.8), e(1)]
    p = [[v / sum(row) for v in row] for row in (row_a, row_b, row_c)]  # temperature 1
    w, degree = [2.0, 1.0, 3.0], [2, 3, 2]
    expected = [sum(w[i] * p[i][j] for i in range(3)) / degree[j] for j in range(3)]
    got = graph_scores(feats, torch.ones(1, 3, dtype=torch.bool), similarity=0.5, temperature=1.0, iterations=1)
    assert torch.allclose(got[0], torch.tensor(expected), rtol=1e-5)


@pytest.mark.parametrize("similarity, temperature, iterations", [(0.5, 0.03, 5), (0.5, 0.03, 1), (0.3, 0.2, 3)])
def test_scores_match_independent_numpy_reference(similarity, temperature, iterations):
    feats = np.array([[1.0, 0.2, 0.0], [0.9, 0.5, 0.1], [0.1, 1.2, 0.3], [-0.2, 0.8, 0.9], [0.0, -0.3, 1.5]])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = cos[~np.eye(5, dtype=bool)]
    assert (off >= 0.5).any() and (off < 0.5).any()  # a graph with both edges and non-edges
    assert np.abs(cos - similarity).min() > 1e-3  # no cosine sits on the threshold
    expected = reference_scores(feats, similarity, temperature, iterations)
    got = graph_scores(
        torch.tensor(feats, dtype=torch.float32)[None],
        torch.ones(1, 5, dtype=torch.bool),
        similarity,
        temperature,
        iterations,
    )
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-4)


def test_padding_and_other_images_do_not_change_a_graph():
    feats = torch.randn(3, 7, 4)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, :2] = False  # image 1 has 5 real tokens, left-padded
    scores = graph_scores(feats, valid)
    assert torch.allclose(scores[1, 2:], graph_scores(feats[1:2, 2:], valid[1:2, 2:])[0], rtol=1e-5)
    assert torch.isneginf(scores[1, :2]).all()
    assert torch.allclose(scores[2], graph_scores(feats[2:], valid[2:])[0], rtol=1e-5)
    assert graph_scores(feats.half(), valid).dtype == torch.float32  # computed in float32


# ---------------------------------------------------------------- the defining property


def test_isolated_background_token_survives_while_a_duplicate_cluster_is_thinned():
    cluster = [[2.0, 0.02 * k, 0.0] for k in range(6)]  # 6 near-duplicates, norm ~2
    lone = [0.0, 0.0, 1.0]  # isolated background token, the smallest norm
    other = [0.0, 1.5, 0.0]  # a second distinct region
    feats = torch.tensor([cluster[0], cluster[1], lone, cluster[2], cluster[3], other, cluster[4], cluster[5]])
    cluster_slots, lone_slot = {0, 1, 3, 4, 6, 7}, 2
    by_norm = set(feats.norm(dim=-1).topk(3).indices.tolist())
    assert lone_slot not in by_norm and by_norm <= cluster_slots  # a norm ranking keeps 3 duplicates
    out = built(info(8), budget=3).vision_output(output_state(feats[None]))
    kept = out.positions[0].tolist()
    assert kept == sorted(kept) and lone_slot in kept and 5 in kept  # both distinct regions, in order
    assert len(cluster_slots & set(kept)) == 1  # the cluster keeps one representative of six
    assert torch.equal(out.hidden[0], feats[kept])


# ---------------------------------------------------------------- arguments


def test_defaults_are_the_official_ones():
    pruner = built(info())
    assert (pruner.keep_ratio, pruner.similarity, pruner.temperature, pruner.iterations) == (0.5, 0.5, 0.03, 5)
    assert pruner.budget == 288 and pruner.stages == frozenset({Stage.VISION_OUTPUT})
    assert built(info(), keep_ratio=1 / 3).budget == 192
    assert built(info(), budget=64, keep_ratio=0.9).budget == 64  # budget wins


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_ratio": 0}, r"keep_ratio must be a number in \(0, 1\], got 0"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        ({"keep_ratio": True}, r"keep_ratio must be a number in \(0, 1\], got True"),
        ({"similarity": 0.0}, r"similarity .* must be in \(0, 1\], got 0.0"),
        ({"similarity": float("nan")}, r"similarity .* must be in \(0, 1\], got nan"),
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
        ({"iterations": -1}, "iterations must be an int >= 0, got -1"),
        ({"iterations": 2.0}, "iterations must be an int >= 0, got 2.0"),
        ({"budget": 0}, "budget must be at least 1, got 0"),
        ({"bogus": 1}, r"unknown argument\(s\) \['bogus'\].*'similarity'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("gprune", **kwargs)


def test_bad_budgets_are_rejected_in_setup():
    with pytest.raises(ValueError, match=r"keep_ratio 0.01 keeps no visual token of 64; allowed keep_ratio >= 0.01562"):
        built(info(64), keep_ratio=0.01)
    with pytest.raises(ValueError, match=r"budget 65 is out of range.*allowed 1..64"):
        built(info(64), budget=65)


# ---------------------------------------------------------------- end to end on the tiny model


def generate(model, inputs, pruner=None, new_tokens: int = 4):
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[:, -new_tokens:]
        with pruners.attach(model, pruner) as report:
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[:, -new_tokens:]
        return out, report.as_dict()


@pytest.mark.parametrize("budget", [1, 32, None])
def test_budget_is_met_exactly_on_the_tiny_model(tiny_llava, budget):
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build("gprune", budget=budget))
    assert stats["visual_tokens"] == (budget or 32)  # default: floor(0.5 * 64)
    assert stats["visual_tokens_llm_input"] == (budget or 32)


def test_batched_equals_one_by_one(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 9], seed=2)
    batched, _ = generate(tiny_llava, inputs, pruners.build("gprune", budget=20))
    for i in range(2):
        alone, _ = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("gprune", budget=20))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    full = pruners.build("gprune", budget=64)
    out, stats = generate(tiny_llava, inputs, full)
    assert stats["visual_tokens"] == 64
    assert torch.equal(out, generate(tiny_llava, inputs))
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits[:, -1]
        with pruners.attach(tiny_llava, full):
            got = tiny_llava(**inputs).logits[:, -1]
    assert (ref - got).abs().max() <= 1e-5
