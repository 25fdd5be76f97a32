"""DyVTE (METHODS.md §5): the router, the label rule, per-sample exits in a batch, caches after an exit,
never-exit equals the unpruned model, and the training step's router input equals the inference one."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMAGE_TOKEN, generate_new_tokens, llava15_info, make_inputs, make_llava, slice_inputs
from torch.nn import functional as F

import pruners
import pruners.learned.dyvte  # noqa: F401  (registers "dyvte" whatever the package imports)
from pruners.learned.dyvte import (
    HIDDEN_RATIO,
    exit_labels,
    exit_step,
    instruction_mask,
    param_count,
    router_features,
)

VISUAL = 64  # visual tokens of conftest's tiny LLaVA (4 LLM layers, width 64)


@pytest.fixture(scope="module")
def model():
    return make_llava(seed=0)


def fresh(seed: int = 0, **kw) -> pruners.Pruner:
    return pruners.build("dyvte", seed=seed, **kw)


# ---------------------------------------------------------------- router


def test_router_shape_init_and_size_scale_with_the_width(model):
    pruner = fresh()
    with pruners.attach(model, pruner):
        pass
    assert len(pruner.routers) == 4 and pruner.hidden == 32 == HIDDEN_RATIO * 64
    router = pruner.routers[0]
    assert router.fc1.weight.shape == (32, 128) and router.fc2.weight.shape == (2, 32)
    assert router.fc1.bias is None and router.fc2.bias is None
    assert sum(p.numel() for p in pruner.parameters()) == param_count(64, 4) == 4 * (128 * 32 + 32 * 2)
    for linear in (router.fc1, router.fc2):  # xavier-uniform: inside +-sqrt(6 / (fan_in + fan_out))
        bound = math.sqrt(6 / sum(linear.weight.shape))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
    assert router(torch.randn(5, 128)).shape == (5, 2)
    # The paper's size: 8192 -> 2048 -> 2 at d = 4096, about 16.8M parameters per router.
    assert param_count(4096, 1) == 8192 * 2048 + 2048 * 2
    assert param_count(128, 4) == 4 * (256 * 64 + 64 * 2)  # the tiny shapes LLaVA


def test_router_features_mean_the_instruction_tokens_and_take_the_last():
    # Sample 0: [t v v t t t]; sample 1: [pad t v t t t] with the last token at slot 5 for both.
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    last = torch.tensor([5, 4])  # sample 1's last prompt token is slot 4 (slot 5: an answer token)
    mask = instruction_mask(valid, visual, last)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]]
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    feats = router_features(hidden, mask, last)
    assert torch.equal(feats[0], torch.cat([(hidden[0, 3] + hidden[0, 4]) / 2, hidden[0, 5]]))
    assert torch.equal(feats[1], torch.cat([hidden[1, 3], hidden[1, 4]]))
    empty = router_features(hidden, torch.zeros_like(mask), last)  # no instruction tokens: zero mean
    assert torch.equal(empty[:, :2], torch.zeros(2, 2))


# ---------------------------------------------------------------- labels


def peaked(tokens: list[int], vocab: int = 5, height: float = 4.0) -> torch.Tensor:
    """(T, V) logits with `height` on the given token of each row."""
    return F.one_hot(torch.tensor(tokens), vocab).float() * height


def test_label_is_one_exactly_when_both_conditions_hold():
    targets = torch.tensor([[1, 2, 3]] * 4)
    answer = torch.tensor([[0, 1, 1]] * 4, dtype=torch.bool)  # position 0 is a prompt position: ignored
    a = torch.stack([peaked([0, 2, 3])] * 4)
    a[1, 1] = torch.tensor([2.0, 0, 1.5, 0, 0])  # sample 1: A answers token 0 where the target is 2
    b = torch.stack([
        peaked([4, 2, 3], height=4.2),  # agree on both answer tokens, CE lower: safe
        peaked([0, 2, 3], height=4.2),  # CE lower (B is right), disagrees with A on one token of two: unsafe
        peaked([0, 2, 3], height=3.8),  # agree, CE_B / CE_A > 1.03: not safe
        peaked([0, 2, 3], height=3.98),  # agree, CE_B / CE_A < 1.03: safe
    ])  # fmt: skip

    def ce(logits):
        return F.cross_entropy(logits[:, 1:].reshape(-1, 5), targets[:, 1:].reshape(-1), reduction="none").view(4, 2)

    ratio = ce(b).mean(-1) / ce(a).mean(-1)
    assert ratio[0] < 1 and ratio[1] < 1 and ratio[2] > 1.03 and 1 < ratio[3] < 1.03  # the construction
    assert exit_labels(a, b, targets, answer).tolist() == [1, 0, 0, 1]


def test_margin_admits_a_small_absolute_rise_of_a_near_zero_cross_entropy():
    # A answers with near certainty (CE_A ~ 0.005 nats); B gives the same answer a little less surely (CE about
    # five times larger, still ~0.02): the paper's ratio says unsafe, a 0.05-nat margin says safe; a real loss of
    # confidence (CE_B ~ 0.7) stays unsafe under the margin.
    targets = torch.tensor([[1, 2]] * 2)
    answer = torch.tensor([[0, 1]] * 2, dtype=torch.bool)
    a = torch.stack([peaked([0, 2], height=7.0)] * 2)
    b = torch.stack([peaked([0, 2], height=5.5), peaked([0, 2], height=1.2)])

    def ce(logits):
        return F.cross_entropy(logits[:, 1], targets[:, 1], reduction="none")

    assert ce(a).max() < 0.01 and 0.01 < ce(b)[0] < 0.05 and ce(b)[1] > 0.5  # the construction
    assert exit_labels(a, b, targets, answer).tolist() == [0, 0]
    assert exit_labels(a, b, targets, answer, ce_margin=0.05).tolist() == [1, 0]


def test_agreement_must_exceed_99_percent():
    tokens = torch.arange(100) % 5
    a = peaked(tokens.tolist())[None].expand(2, -1, -1)
    b = a.clone()
    b[0, 7] = peaked([(int(tokens[7]) + 1) % 5])[0] * 0.5  # one of 100 differs: 99% is not more than 99%
    targets = tokens[None].expand(2, -1)
    answer = torch.ones(2, 100, dtype=torch.bool)
    assert exit_labels(a, b, targets, answer, ce_ratio=10.0).tolist() == [0, 1]


# ---------------------------------------------------------------- inference


def exit_probabilities(model, inputs, pruner) -> torch.Tensor:
    """(hooked layers, B) p_exit of every sample at every hooked layer, from a run where nobody exits."""
    seen = []
    pruner.threshold = 1.0
    original = pruner.exit_probability

    def record(layer, feats):
        seen.append(original(layer, feats))
        return seen[-1]

    pruner.exit_probability = record
    with torch.no_grad(), pruners.attach(model, pruner):
        model(**inputs)
    del pruner.exit_probability
    return torch.stack(seen)


def spread_threshold(probs: torch.Tensor, margin: float = 1e-3) -> tuple[float, list[int]]:
    """The threshold giving the most distinct exit layers (first layer with p > t; -1 if none), at least
    `margin` away from every probability; and those exit layers."""
    best = (-1, 0.5, [])
    values = sorted(set(probs.flatten().tolist()))
    for lo, hi in zip(values, values[1:]):
        if hi - lo < 2 * margin:
            continue
        t = (lo + hi) / 2
        above = probs > t
        exits = [int(above[:, i].nonzero()[0]) if above[:, i].any() else -1 for i in range(probs.shape[1])]
        if len(set(exits)) > best[0]:
            best = (len(set(exits)), t, exits)
    return best[1], best[2]


def test_per_sample_exits_in_a_batch_equal_one_by_one_runs(model):
    """Each sample leaves after the first layer where its p_exit > threshold; in one batch the exits differ,
    and every sample's tokens, exit layer and per-layer visual counts equal its run alone."""
    inputs = make_inputs(model, [3, 9, 5, 6, 4], seed=1)
    pruner = fresh()
    threshold, expected = spread_threshold(exit_probabilities(model, inputs, pruner))
    assert len(set(expected)) >= 3 and -1 in expected, expected  # several exit layers and a never-exit
    pruner.threshold = threshold
    batched, report = generate_new_tokens(model, inputs, pruner, report=True)
    assert pruner.exit_layers.tolist() == expected
    for i, k in enumerate(expected):
        alone = generate_new_tokens(model, slice_inputs(inputs, i), pruner)
        assert torch.equal(batched[i], alone[0]) and pruner.exit_layers.tolist() == [k]
    per_layer = [sum(VISUAL if k == -1 or layer <= k else 0 for k in expected) / len(expected) for layer in range(4)]
    assert report["visual_tokens_per_layer"] == pytest.approx(per_layer)
    assert report["visual_tokens_layer_mean"] == pytest.approx(sum(per_layer) / 4)


@pytest.mark.parametrize("k", [0, 2])
def test_after_an_exit_later_layers_cache_no_visual_token(model, k):
    inputs = make_inputs(model, [5])
    length = inputs["input_ids"].shape[1]
    pruner = fresh()
    pruner.exit_probability = lambda layer, feats: torch.full((feats.shape[0],), float(layer == k))
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        assert [layer.keys.shape[2] for layer in cache.layers] == [length if i <= k else length - VISUAL
                                                                   for i in range(4)]
        step = {"input_ids": out.logits[:, -1:].argmax(-1), "past_key_values": cache, "use_cache": True,
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
        model(**step)  # a decode step: the exit persists, later layers still hold text only
    assert [layer.keys.shape[2] for layer in cache.layers] == [length + 1 if i <= k else length + 1 - VISUAL
                                                               for i in range(4)]
    assert report.as_dict()["visual_tokens_per_layer"] == [VISUAL if i <= k else 0 for i in range(4)]
    assert pruner.exit_layers.tolist() == [k]


def test_never_exit_equals_the_unpruned_model(model):
    inputs = make_inputs(model, [3, 8])
    pruner = fresh(threshold=1.0)
    assert torch.equal(generate_new_tokens(model, inputs, pruner), generate_new_tokens(model, inputs))
    with torch.no_grad():
        ref = model(**inputs).logits
        with pruners.attach(model, pruner):
            out = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ref - out)[real].abs().max() <= 1e-5 and pruner.exit_layers.tolist() == [-1, -1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 64}, "budget must be None, got 64"),
        ({"threshold": 1.5}, "threshold must be a number in 0..1"),
        ({"hidden_ratio": 0}, "hidden_ratio must be a number > 0"),
        ({"width": 64}, "give both width and layers"),
        ({"seed": -1}, "seed must be an int >= 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("dyvte", **kwargs)


def test_dyvte_is_adaptive_and_takes_no_budget():
    """No budget to set (the registry-wide budget checks and sweeps leave `adaptive` pruners out)."""
    assert pruners.registry.get("dyvte").adaptive and not pruners.registry.get("vtw").adaptive
    assert pruners.build("dyvte").budget is None


def test_routers_of_another_model_size_are_refused_at_attach(model):
    pruner = pruners.build("dyvte", width=96, layers=32)  # built now: a checkpoint's weights can load
    assert len(pruner.routers) == 32 and pruner.hidden == 48
    pruner.setup(llava15_info(llm_width=96))  # 32 layers of width 96: fits
    with pytest.raises(ValueError, match="width 96 and 32 layers; this model's LLM has width 64 and 4 layers"):
        with pruners.attach(model, pruner):
            pass
    assert "forward" not in vars(model.model)


# ---------------------------------------------------------------- training step


def test_training_step_router_input_equals_the_inference_one_and_only_router_k_learns(model):
    """Training sees prompt + answer: its router input (copy A at layer k, detached) is the one inference
    computes on the prompt alone; the label of the last layer is 1 (B = A); gradients reach router k only."""
    prompts = make_inputs(model, [4, 7], seed=3)
    answer = torch.tensor([[11, 12], [13, 14]])
    inputs = {**prompts, "input_ids": torch.cat([prompts["input_ids"], answer], 1),
              "attention_mask": torch.cat([prompts["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)}
    lengths = torch.tensor([2, 2])
    pruner = fresh()
    inference = {}
    with pruners.attach(model, pruner):
        pass
    original = pruner.exit_probability

    def record(layer, feats):
        inference[layer] = feats
        return original(layer, feats)

    pruner.threshold = 1.0
    pruner.exit_probability = record
    with torch.no_grad(), pruners.attach(model, pruner):
        model(**prompts)
    del pruner.exit_probability
    training = {}
    for router in pruner.routers:
        router.register_forward_pre_hook(lambda module, args: training.__setitem__("f", args[0]))
    for k in (1, 3):
        logits, labels = exit_step(model, pruner, inputs, lengths, k, IMAGE_TOKEN)
        assert logits.shape == (2, 2) and labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
        if k in inference:
            assert torch.allclose(training["f"], inference[k], atol=1e-5)
        else:
            assert labels.tolist() == [1, 1]  # the last layer: copy B is copy A
        pruner.zero_grad()
        F.cross_entropy(logits, labels).backward()
        assert [r.fc1.weight.grad is not None for r in pruner.routers] == [i == k for i in range(4)]
        assert not any(p.grad is not None for p in model.parameters())


def test_withdrawn_copy_changes_labels_where_the_image_matters(model):
    """A sample whose answer needs the image gets label 0 at an early layer: here, with random weights, the
    early withdrawal changes the argmax somewhere (so the rule is not always 1) while the last layer is 1."""
    prompts = make_inputs(model, [4, 7, 5, 6], seed=5)
    with torch.no_grad():
        target = model(**prompts).logits[:, -1].argmax(-1, keepdim=True)  # copy A's own answer
    inputs = {**prompts, "input_ids": torch.cat([prompts["input_ids"], target], 1),
              "attention_mask": torch.cat([prompts["attention_mask"], torch.ones(4, 1, dtype=torch.long)], 1)}
    pruner = fresh()
    with pruners.attach(model, pruner):
        pass
    _, early = exit_step(model, pruner, inputs, torch.ones(4, dtype=torch.long), 0, IMAGE_TOKEN)
    _, last = exit_step(model, pruner, inputs, torch.ones(4, dtype=torch.long), 3, IMAGE_TOKEN)
    assert 0 in early.tolist() and last.tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- checkpoint folder


def test_a_saved_folder_loads_by_path_to_the_same_exits_and_only_on_its_model(model, tmp_path):
    from pruners.learned.checkpoint import model_identity

    inputs = make_inputs(model, [3, 9, 5], seed=2)
    pruner = fresh(seed=4, threshold=0.6)
    out = generate_new_tokens(model, inputs, pruner)
    exits = pruner.exit_layers.tolist()
    folder = pruner.save(tmp_path / "dyvte", model_identity(model))
    loaded = pruners.build("dyvte", checkpoint=str(folder))  # routers built from the stored width and depth
    assert (loaded.width, loaded.layers, loaded.threshold, loaded.seed) == (64, 4, 0.6, 4)
    assert torch.equal(generate_new_tokens(model, inputs, loaded), out) and loaded.exit_layers.tolist() == exits
    never = pruners.build("dyvte", checkpoint=str(folder), threshold=1.0)  # an argument given beside it wins
    generate_new_tokens(model, inputs, never)
    assert never.exit_layers.tolist() == [-1, -1, -1]
    other = make_llava(seed=1)  # same configuration, other weights
    with pytest.raises(ValueError, match="was trained on .* other weights"):
        with pruners.attach(other, loaded):
            pass
    assert "forward" not in vars(other.model)
