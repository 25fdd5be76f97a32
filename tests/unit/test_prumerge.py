"""LLaVA-PruMerge / PruMerge+ (METHODS.md §6): full-width CLS attention, the IQR count, the merge formula, the uniform
samples, the official order, the projector path, argument checks and end-to-end runs on the tiny model."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs

import pruners
import pruners.methods.prumerge  # noqa: F401  (registers prumerge, prumerge-plus)
from pruners.base import Stage, TokenState
from pruners.methods.prumerge import absorb, cls_attention, iqr_outliers, pool_pruned, spread
from pruners.ops import attention_rows

GRID = (8, 8)
N = 64


def info(**changes):
    tiny = dict(visual_tokens=N, grid=GRID, vision_layers=3, vision_feature_layer=2, llm_layers=4)
    return llava15_info(**{**tiny, **changes})


built = functools.partial(setup_pruner, "prumerge", info())
built_plus = functools.partial(setup_pruner, "prumerge-plus", info())


class Probe:
    """The runtime's vision probe from explicit per-head queries and keys (B, H, W, hd), with `keys()`."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor) -> None:
        self.query, self.key = query, key

    def __call__(self, query_index, heads="mean", logits=False):
        return attention_rows(self.query, self.key, query_index, self.query.shape[-1] ** -0.5, None, heads, logits)

    def keys(self) -> torch.Tensor:
        return self.key


class LogitProbe:
    """A one-head probe whose CLS row has the given logits (B, W); keys are given (B, W, D)."""

    def __init__(self, logits: torch.Tensor, keys: torch.Tensor) -> None:
        self.logits, self.key = logits, keys[:, None]

    def __call__(self, query_index, heads="mean", logits=False):
        assert heads == "none" and logits
        return self.logits[:, None, None, :]

    def keys(self) -> torch.Tensor:
        return self.key


def output_state(hidden: torch.Tensor, probe, features: torch.Tensor | None = None) -> TokenState:
    """VISION_OUTPUT state of the runtime ('default' strategy): patches in raster order, CLS features first.
    Without `features`, the CLIP features are `hidden` (after a random CLS row) and the projector is the identity."""
    bsz, n, width = hidden.shape
    patches = torch.arange(n).expand(bsz, n)
    projector = torch.nn.Identity()
    if features is None:
        features = torch.cat([torch.randn(bsz, 1, width), hidden], 1)
    return TokenState(
        hidden=hidden,
        valid=torch.ones(bsz, n, dtype=torch.bool),
        visual=torch.ones(bsz, n, dtype=torch.bool),
        positions=patches,
        origin=patches,
        sizes=torch.ones(bsz, n),
        stage=Stage.VISION_OUTPUT,
        grid=GRID,
        num_images=torch.ones(bsz, dtype=torch.long),
        extras={"vision_hidden": features, "vision_attention": probe, "projector": projector},
    )


def kept_positions(out: TokenState, row: int = 0) -> list[int]:
    return out.positions[row][out.valid[row]].tolist()


# ---------------------------------------------------------------- step 1: CLS attention over the full width


def test_cls_attention_is_one_softmax_over_the_concatenated_heads():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    got = cls_attention(Probe(q, k), torch.zeros(2, dtype=torch.long), torch.ones(2, 7, dtype=torch.bool))
    full_q, full_k = (t.transpose(1, 2).reshape(2, 7, 32) for t in (q, k))
    expected = (full_q[:, 0:1] @ full_k.transpose(1, 2) / math.sqrt(32)).softmax(-1)[:, 0]
    assert torch.allclose(got, expected, atol=1e-6)
    head_mean = (q[:, :, 0:1] @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1).mean(1)[:, 0]
    assert not torch.allclose(got, head_mean, atol=1e-3)  # not the per-head attention


# ---------------------------------------------------------------- step 2: the interquartile-range rule


def test_iqr_count_known_outliers():
    # 1..16 and three outliers: Q1 = 5.5, Q3 = 14.5 (linear interpolation), fence 14.5 + 1.5 * 9 = 28.
    attn = torch.tensor([[*range(1, 17), 40.0, 50.0, 60.0], [*range(1, 17), 28.0, 60.0, 70.0]])
    assert iqr_outliers(attn, torch.ones_like(attn, dtype=torch.bool)).tolist() == [3, 2]  # 28 is not above 28


def test_iqr_count_matches_numpy_percentile_per_image():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(4, 576, generator=g) ** 6  # heavy right tail
    valid = torch.ones_like(attn, dtype=torch.bool)
    valid[3, :100] = False  # a padded image: quartiles over its own tokens only
    expected = []
    for row, mask in zip(attn.numpy(), valid.numpy()):
        q1, q3 = np.percentile(row[mask], 25), np.percentile(row[mask], 75)
        expected.append(int((row[mask] > q3 + 1.5 * (q3 - q1)).sum()))
    assert iqr_outliers(attn, valid).tolist() == expected


def spiky_logits(outliers: dict[int, float], bsz: int = 1) -> torch.Tensor:
    """CLS-row logits over CLS + 64 patches: every patch 0 except the given ones (IQR 0, fence = Q3)."""
    logits = torch.zeros(bsz, N + 1)
    for patch, value in outliers.items():
        logits[:, 1 + patch] = value
    return logits


def test_adaptive_mode_keeps_exactly_the_outliers_plus_the_extra_token():
    probe = LogitProbe(spiky_logits({9: 5.0, 40: 6.0, 3: 4.0}), torch.randn(1, N + 1, 6))
    out = built(order="raster").vision_output(output_state(torch.randn(1, N, 4), probe))
    # 3 outliers keep their slots; the extra token sits in the last pruned patch's slot (63).
    assert kept_positions(out) == [3, 9, 40, 63]
    out = built().vision_output(output_state(torch.randn(1, N, 4), probe))
    assert out.origin[0].tolist() == [3, 9, 40, 63] and kept_positions(out) == [2, 1, 0, 3]  # official order
    assert built(extra_token=False).vision_output(output_state(torch.randn(1, N, 4), probe)).num_tokens == 3


# ---------------------------------------------------------------- step 3-4: merge and the extra token, by hand

# Scalar features; keys: 1 and 3 are token 0's nearest (cos .995, .981), 2 is orthogonal.
X = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
A = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
KEYS = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.2]]])
ALL = torch.ones(1, 4, dtype=torch.bool)


def test_merged_token_is_the_attention_weighted_sum_of_its_key_neighbours():
    centre = torch.tensor([[0]])
    official = absorb(X, A, KEYS, centre, ALL, k=2, merge="official")
    assert torch.allclose(official, torch.tensor([[[1 + 0.1 * 10 + 0.2 * 1000]]]))  # x_p + sum_j a_j x_j
    average = absorb(X, A, KEYS, centre, ALL, k=2, merge="average")
    expected = (0.4 * 1 + 0.1 * 10 + 0.2 * 1000) / (0.4 + 0.1 + 0.2)
    assert torch.allclose(average, torch.tensor([[[expected]]]))
    # Neighbours are taken among all other tokens, kept ones included, never the centre itself.
    both = absorb(X, A, KEYS, torch.tensor([[0, 1]]), ALL, k=1, merge="official")
    assert torch.allclose(both, torch.tensor([[[1 + 0.1 * 10], [10 + 0.4 * 1]]]))


def test_extra_token_pools_the_pruned_tokens():
    pruned = torch.tensor([[False, True, True, True]])
    assert torch.allclose(pool_pruned(X, A, pruned, "official"), torch.tensor([[0.1 * 10 + 0.3 * 100 + 0.2 * 1000]]))
    assert torch.allclose(pool_pruned(X, A, pruned, "average"), torch.tensor([[231 / 0.6]]))


def reference(hidden, logits, keys, keep: list[int], samples: list[int], k: int, merge: str):
    """PruMerge(+) for one image written out literally: (tokens in official order, extra token)."""
    a = logits.softmax(-1)[1:].tolist()
    keys = keys[1:]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    tokens = []
    for p in keep + samples:
        sims = [(float(unit[p] @ unit[j]), -j, j) for j in range(len(a)) if j != p]
        nbrs = [j for _, _, j in sorted(sims, reverse=True)[:k]]
        total = sum(a[j] * hidden[j] for j in nbrs)
        if merge == "official":
            tokens.append(hidden[p] + total)
        else:
            tokens.append((a[p] * hidden[p] + total) / (a[p] + sum(a[j] for j in nbrs)))
    rest = [j for j in range(len(a)) if j not in keep + samples]
    extra = sum(a[j] * hidden[j] for j in rest)
    if merge == "average":
        extra = extra / sum(a[j] for j in rest)
    return torch.stack(tokens + [extra])


@pytest.mark.parametrize("merge", ["average", "official"])
def test_pruner_output_matches_the_literal_algorithm(merge):
    torch.manual_seed(2)
    hidden, keys = torch.randn(2, N, 4), torch.randn(2, N + 1, 6)
    logits = torch.randn(2, N + 1)
    out = built(budget=10, merge=merge, k_neighbors=5).vision_output(output_state(hidden, LogitProbe(logits, keys)))
    for b in range(2):
        keep = logits[b, 1:].argsort(descending=True)[:9].tolist()
        expected = reference(hidden[b], logits[b], keys[b], keep, [], 5, merge)
        order = out.positions[b].argsort()  # the sequence the LLM sees
        assert torch.allclose(out.hidden[b][order], expected, atol=1e-5)
        assert out.origin[b][order][:9].tolist() == keep


# ---------------------------------------------------------------- step 5: PruMerge+ adds the uniform grid


def test_plus_adds_every_stride_th_patch_skipping_duplicates():
    # 2 outliers of 64: r = 2 / 64, stride floor(floor(64 / 2) / 3) = 10: patches 0, 10, ..., 60 (below 63).
    probe = LogitProbe(spiky_logits({20: 6.0, 7: 5.0}), torch.randn(1, N + 1, 6))
    out = built_plus().vision_output(output_state(torch.randn(1, N, 4), probe))
    grid = [0, 10, 30, 40, 50, 60]  # 20 is an outlier already
    order = out.positions[0].argsort()
    assert out.origin[0][order].tolist() == [20, 7, *grid, 63]  # outliers by attention, samples, extra token
    plain = built().vision_output(output_state(torch.randn(1, N, 4), probe))
    assert plain.num_tokens == 3 and out.num_tokens == 3 + len(grid)


def test_plus_budget_mode_splits_outliers_and_evenly_spread_samples():
    probe = LogitProbe(spiky_logits({5: 9.0, 33: 8.0, 50: 7.0, 12: 6.0}), torch.randn(1, N + 1, 6))
    out = built_plus(budget=13).vision_output(output_state(torch.randn(1, N, 4), probe))
    assert out.num_tokens == 13
    order = out.positions[0].argsort()
    origin = out.origin[0][order].tolist()
    # 12 places: round(0.25 * 12) = 3 outliers, 9 samples at ranks floor(i * 61 / 9) of the other 61 patches.
    assert origin[:3] == [5, 33, 50]
    rest = [p for p in range(N) if p not in (5, 33, 50)]
    assert origin[3:12] == [rest[i * 61 // 9] for i in range(9)]


def test_spread_is_exact_and_even():
    pool = torch.ones(3, 20, dtype=torch.bool)
    pool[2, ::2] = False
    chosen = spread(pool, torch.arange(20).expand(3, 20), torch.tensor([4, 20, 3]))
    assert chosen[0].nonzero()[:, 0].tolist() == [0, 5, 10, 15]
    assert chosen[1].all()
    assert chosen[2].nonzero()[:, 0].tolist() == [1, 7, 13]  # ranks 0, 3, 6 of the odd patches


# ---------------------------------------------------------------- merge space: CLIP features, then the projector


def test_merges_clip_features_then_projects():
    torch.manual_seed(3)
    features, keys, logits = torch.randn(1, N + 1, 5), torch.randn(1, N + 1, 6), torch.randn(1, N + 1)
    projector = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    state = output_state(projector(features[:, 1:]).detach(), LogitProbe(logits, keys), features)
    state.extras["projector"] = projector
    out = built(budget=6).vision_output(state)
    keep = logits[0, 1:].argsort(descending=True)[:5].tolist()
    expected = projector(reference(features[0, 1:], logits[0], keys[0], keep, [], 32, "average"))
    assert torch.allclose(out.hidden[0][out.positions[0].argsort()], expected, atol=1e-5)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_neighbors": 0}, "k_neighbors must be an int >= 1, got 0"),
        ({"k_neighbors": True}, "k_neighbors must be an int >= 1, got True"),
        ({"merge": "sum"}, r"merge must be one of \('average', 'official'\), got 'sum'"),
        ({"order": "spatial"}, r"order must be one of \('official', 'raster'\), got 'spatial'"),
        ({"extra_token": 1}, "extra_token must be True or False, got 1"),
        ({"budget": 0}, "budget must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    for name in ("prumerge", "prumerge-plus"):
        with pytest.raises(ValueError, match=match):
            pruners.build(name, **kwargs)


def test_plus_arguments():
    for share in (-0.1, 1.5, "half", True, float("nan")):
        with pytest.raises(ValueError, match=r"outlier_share must be a number in \[0, 1\]"):
            pruners.build("prumerge-plus", outlier_share=share)
    with pytest.raises(ValueError, match="unknown argument"):
        pruners.build("prumerge", outlier_share=0.5)


def test_setup_rejects_a_model_without_a_layer_after_the_features():
    with pytest.raises(ValueError, match=r"vision_feature_layer 3 is the encoder's output; allowed 0\.\.2"):
        setup_pruner("prumerge", info(vision_feature_layer=3))
    with pytest.raises(ValueError, match=r"budget 65 is out of range .* allowed 1\.\.64"):
        setup_pruner("prumerge", info(), budget=65)


# ---------------------------------------------------------------- end to end on the tiny LLaVA


def generate(model, inputs, pruner, new: int = 4):
    # min_new_tokens: the tiny vocabulary's EOS (2) would end one sample early and pad it in the batch.
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, -new:]
    return out, report


@pytest.mark.parametrize("name", ["prumerge", "prumerge-plus"])
@pytest.mark.parametrize("budget", [None, 32])
def test_batched_equals_one_by_one(tiny_llava, name, budget):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched, _ = generate(tiny_llava, inputs, pruners.build(name, budget=budget))
    for i in range(2):
        alone, _ = generate(tiny_llava, slice_inputs(inputs, i), pruners.build(name, budget=budget))
        assert torch.equal(batched[i], alone[0]), f"{name}: sample {i} differs when batched"


@pytest.mark.parametrize("name", ["prumerge", "prumerge-plus"])
@pytest.mark.parametrize("budget", [1, 2, 32, 63, 64])
def test_budget_reaches_the_last_layer_exactly(tiny_llava, name, budget):
    _, report = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruners.build(name, budget=budget), new=2)
    stats = report.as_dict()
    assert stats["visual_tokens"] == budget and stats["visual_tokens_llm_input"] == budget


def test_adaptive_count_follows_the_iqr_rule_of_the_last_clip_layer():
    model = make_llava(seed=4)
    inputs = make_inputs(model, [3, 5, 7], seed=4)
    _, report = generate(model, inputs, pruners.build("prumerge"), new=1)
    # Independent computation from HF's own outputs: layer 2 (the last) on hidden_states[-2].
    tower = model.model.vision_tower
    with torch.no_grad():
        feats = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        layer = tower.encoder.layers[2]
        normed = layer.layer_norm1(feats)
        q, k = layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
    attn = (q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)[:, 0, 1:].numpy()
    expected = []
    for row in attn:
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        expected.append(int((row > q3 + 1.5 * (q3 - q1)).sum()) + 1)  # + the extra token
    assert [r.llm_visual[-1] for r in report.samples] == expected


@pytest.mark.parametrize("name", ["prumerge", "prumerge-plus"])
def test_full_feature_strategy_counts_the_cls_image_token(name):
    model = make_llava(strategy="full")  # 65 image tokens: CLS in image slot 0, then the 64 patches
    inputs = make_inputs(model, [3, 9])
    for budget in (1, 32, 65):
        for order in ("official", "raster"):
            _, report = generate(model, inputs, pruners.build(name, budget=budget, order=order), new=1)
            assert report.as_dict()["visual_tokens"] == budget
