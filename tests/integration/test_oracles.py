"""The correctness oracles every change keeps green (DESIGN.md, Tests)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs, make_llava, slice_inputs

import pruners

# Budgets that every registered pruner accepts on the 64-token tiny model.
BUDGET = 32
NEW_TOKENS = 5


# Pruners that take no budget (`Pruner.adaptive`: each sample's visual count is the pruner's own decision, as
# DyVTE's learned exits); they are built without one, and the budget tests leave them out (their own tests check
# the count).
NO_BUDGET = {name for name in pruners.available() if pruners.registry.get(name).adaptive}


def build(name: str, budget: int | None = BUDGET, **kw) -> pruners.Pruner:
    if name in NO_BUDGET:
        return pruners.build(name, **kw)
    return pruners.build(name) if name == "none" else pruners.build(name, budget=budget, **kw)


def generate(model, inputs, pruner=None, **kw):
    """The new tokens; a sample that ends early is padded (as in a batch) so every row has NEW_TOKENS."""
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **kw}
    with torch.no_grad():
        if pruner is None:
            out = model.generate(**inputs, **kw)
        else:
            with pruners.attach(model, pruner):
                out = model.generate(**inputs, **kw)
    new = out[:, inputs["input_ids"].shape[1] :]
    pad = model.generation_config.pad_token_id
    return torch.nn.functional.pad(new, (0, NEW_TOKENS - new.shape[1]), value=pad)


def test_none_forward_matches_hf(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits
        with pruners.attach(tiny_llava, pruners.build("none")):
            out = tiny_llava(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ref - out)[real].abs().max() <= 1e-5


# Pruners for which budget 64 (with these arguments) keeps every token of the 64-token tiny model unchanged.
# Not here: random, pool, tome, prumerge(-plus) (they merge or reorder whatever the budget).
KEEP_ALL = {"none": {}, "fastv": {}, "gprune": {}, "mustdrop": {}, "tokencarve": {}, "ficoco-v": {},
            "ficoco-l": {}, "ficoco-vl": {}, "sparsevlm": {}, "pdrop": {}, "fitprune": {}, "dart": {}, "vtw": {},
            "visionzip": {"order": "raster"}}  # fmt: skip
# Pruners whose `budget` is the layer-average of the visual tokens (the last layer holds none): VTW.
LAYER_MEAN_BUDGET = {"vtw"}


def budget_met(name: str, stats: dict, budget: int, visual: int = 64, layers: int = 4) -> bool:
    if name not in LAYER_MEAN_BUDGET:
        return stats["visual_tokens"] == budget
    # VTW withdraws every visual token after layer K = floor(budget * L / N + 1/2), at least 1.
    k = min(max(math.floor(budget * layers / visual + 0.5), 1), layers)
    return stats["visual_tokens_layer_mean"] == k * visual / layers


@pytest.mark.parametrize("pruner", sorted(KEEP_ALL))
def test_keep_everything_generation_matches_hf(tiny_llava, pruner):
    inputs = make_inputs(tiny_llava, [3, 8])
    full = build(pruner, budget=64, **KEEP_ALL[pruner]) if pruner != "none" else build("none")
    assert torch.equal(generate(tiny_llava, inputs, full), generate(tiny_llava, inputs))
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits[:, -1]
        with pruners.attach(tiny_llava, full):
            out = tiny_llava(**inputs).logits[:, -1]
    assert (ref - out).abs().max() <= 1e-5


def test_none_sampling_matches_hf(tiny_llava):
    inputs = make_inputs(tiny_llava, [4, 6])
    torch.manual_seed(7)
    ref = generate(tiny_llava, inputs, do_sample=True, top_k=0)
    torch.manual_seed(7)
    out = generate(tiny_llava, inputs, build("none"), do_sample=True, top_k=0)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("name", pruners.available())
def test_batched_equals_one_by_one(tiny_llava, name):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, build(name))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), build(name))
        assert torch.equal(batched[i], alone[0]), f"{name}: sample {i} differs when batched"


@pytest.mark.parametrize("name", pruners.available())
def test_model_restored_after_attach(name):
    model = make_llava(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs(model, [4, 6])
    ref = generate(model, inputs)
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}  # HF installs its own
    generate(model, inputs, build(name))
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(generate(model, inputs), ref)


@pytest.mark.parametrize("name", [n for n in pruners.available() if n != "none" and n not in NO_BUDGET])
def test_visual_tokens_equal_budget(tiny_llava, name):
    inputs = make_inputs(tiny_llava, [3, 9])
    with torch.no_grad(), pruners.attach(tiny_llava, build(name)) as report:
        tiny_llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = report.as_dict()
    assert budget_met(name, stats, BUDGET)
    assert stats["num_samples"] == 2
    assert stats["prefill_flops"] > 0 and stats["kv_cache_bytes"] > 0


def test_pruned_layer_cache_is_shorter(tiny_llava):
    inputs = make_inputs(tiny_llava, [5])
    with torch.no_grad(), pruners.attach(tiny_llava, pruners.build("fastv", budget=16, k=2)) as report:
        cache = tiny_llava(**inputs, use_cache=True).past_key_values
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths[0] == lengths[1] == inputs["input_ids"].shape[1]
    assert lengths[2] == lengths[3] == inputs["input_ids"].shape[1] - (64 - 16)
    per_layer = report.as_dict()["kv_cache_bytes_per_layer"]
    assert per_layer[2] < per_layer[1]


def test_unsupported_family_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=10))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not supported; supported: LlavaForConditionalGeneration"):
        with pruners.attach(lm, pruners.build("none")):
            pass


def test_budget_out_of_range_is_rejected(tiny_llava):
    with pytest.raises(ValueError, match=r"budget 65 is out of range .* allowed 1\.\.64"):
        with pruners.attach(tiny_llava, pruners.build("fastv", budget=65)):
            pass
    assert "forward" not in vars(tiny_llava.model)


@pytest.mark.parametrize("name", [n for n in pruners.available() if n != "none" and n not in NO_BUDGET])
def test_every_accepted_budget_runs_and_is_met(tiny_llava, name):
    """Each budget 1..64 either is rejected at attach with a ValueError or is met exactly."""
    inputs = make_inputs(tiny_llava, [2, 4])
    accepted = 0
    for budget in range(1, 65):
        try:
            with torch.no_grad(), pruners.attach(tiny_llava, pruners.build(name, budget=budget)) as report:
                tiny_llava(**inputs)
        except ValueError as err:
            message = str(err)
            assert str(budget) in message and ("allowed" in message or "nearest" in message), message
            continue
        accepted += 1
        assert budget_met(name, report.as_dict(), budget), f"{name} at budget {budget}"
    assert accepted >= 10
