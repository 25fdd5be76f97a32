"""The learned gate and the learned-pruner checkpoint folder: the straight-through top-k, exact budgets from one
gate, training forward = inference forward, save/load, the model-identity check and the LoRA adapter's attach."""

from __future__ import annotations

import pytest
import torch
from conftest import generate_new_tokens, make_inputs, make_llava, slice_inputs
from peft import LoraConfig, inject_adapter_in_model

import pruners
from pruners.learned.checkpoint import adapter_payload, model_identity, save_pruner
from pruners.learned.gate import GatePruner, parameter_count, straight_through_topk, topk_threshold
from pruners.ops import top_mask


@pytest.fixture(scope="module")
def model():
    return make_llava(seed=0)  # 64 visual tokens, LLM width 64, 4 layers


def attached_gate(model, **kw) -> GatePruner:
    gate = pruners.build("gate", **kw)
    with pruners.attach(model, gate):  # builds the scorer for this model's width
        pass
    return gate


def kept_slots(model, gate, inputs) -> list[list[int]]:
    """Each sample's kept visual tokens (patch indices) after the gate, from a spy on `select`."""
    seen = {}
    original = gate.select

    def spy(state, scores, k):
        new = original(state, scores, k)
        seen["kept"] = [sorted(p[v].tolist()) for p, v in zip(new.positions, new.visual & new.valid)]
        return new

    gate.select = spy
    try:
        with torch.no_grad(), pruners.attach(model, gate):
            model(**inputs)
    finally:
        del gate.select
    return seen["kept"]


# ---------------------------------------------------------------- the straight-through top-k


def test_straight_through_topk_keeps_exactly_k_and_passes_the_sigmoid_gradient():
    torch.manual_seed(0)
    scores = torch.randn(3, 10, requires_grad=True)
    candidates = torch.ones(3, 10, dtype=torch.bool)
    candidates[1, :3] = False  # 7 candidates in row 1
    k = torch.tensor([1, 4, 12])  # row 2 asks for more than it has
    weight = torch.randn(3, 10)
    mask = straight_through_topk(scores, candidates, k, temperature=0.5)
    # Forward: exactly the hard top-k, 0/1 only, min(k, candidates) per row.
    assert torch.equal(mask, top_mask(scores, candidates, k).float())
    assert mask.sum(-1).tolist() == [1, 4, 10]
    (mask * weight).sum().backward()
    # Backward: d/ds of sigmoid((s - t) / T) at the fixed threshold t, on candidates only.
    t = topk_threshold(scores, candidates, k)
    soft = torch.sigmoid((scores.detach() - t[:, None]) / 0.5)
    expected = weight * soft * (1 - soft) / 0.5 * candidates
    assert torch.allclose(scores.grad, expected, atol=1e-6)
    assert (scores.grad[candidates] != 0).all() and (scores.grad[~candidates] == 0).all()


def test_threshold_lies_between_the_kth_and_the_next_score():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0]])
    candidates = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(topk_threshold(scores, candidates, torch.tensor([2, 1])), torch.tensor([0.4, 3.5]))
    # Everything kept: one below the last kept score, so every candidate's sigmoid is above one half.
    assert torch.allclose(topk_threshold(scores, candidates, torch.tensor([4, 9])), torch.tensor([-0.9, 0.0]))


# ---------------------------------------------------------------- the gate at inference


def test_one_gate_keeps_exactly_each_budget_and_its_choices_nest(model):
    """The ranking does not depend on the budget: one gate serves every budget, smaller sets inside larger."""
    gate = attached_gate(model)
    inputs = make_inputs(model, [3, 7], seed=2)
    kept = {}
    for budget in (8, 16, 32):
        gate.use_budget(budget)
        with torch.no_grad(), pruners.attach(model, gate) as report:
            model(**inputs)
        assert report.as_dict()["visual_tokens"] == budget
        kept[budget] = kept_slots(model, gate, inputs)
        assert [len(k) for k in kept[budget]] == [budget, budget]
    for sample in range(2):
        assert set(kept[8][sample]) <= set(kept[16][sample]) <= set(kept[32][sample])


def test_the_question_conditions_the_choice(model):
    gate = attached_gate(model, budget=16)
    inputs = make_inputs(model, [6], seed=4)
    other = {**inputs, "input_ids": inputs["input_ids"].clone()}
    other["input_ids"][0, -6:] = torch.tensor([10, 11, 12, 13, 14, 15])  # same image, another question
    assert kept_slots(model, gate, inputs) != kept_slots(model, gate, other)


def test_parameter_count_formula_and_width_from_the_model(model):
    gate = attached_gate(model, hidden=32)
    assert gate.dim == 64 and sum(p.numel() for p in gate.parameters()) == parameter_count(64, 32)
    assert parameter_count(128, 64) == 33_409  # the tiny shapes LLaVA
    assert torch.equal(attached_gate(model, hidden=32).scorer.out.weight, gate.scorer.out.weight)  # seeded init


def test_keep_everything_equals_the_unpruned_model_in_both_modes(model):
    inputs = make_inputs(model, [3, 8])
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
    for training in (False, True):
        gate = attached_gate(model, budget=64).train(training)
        with pruners.attach(model, gate):
            out = model(**inputs).logits[:, -1]
        assert torch.equal(out, reference), f"training={training}"
    assert torch.equal(generate_new_tokens(model, inputs, attached_gate(model, budget=64)),
                       generate_new_tokens(model, inputs))  # fmt: skip


def test_training_forward_equals_inference_and_reaches_the_scorer(model):
    """Without noise, training mode keeps the same tokens with the same values (the gate value is exactly 1)
    while the loss's gradient reaches every scorer weight."""
    inputs = make_inputs(model, [3, 8], seed=5)
    gate = attached_gate(model, budget=16, noise=0.0)
    with torch.no_grad(), pruners.attach(model, gate):
        inference = model(**inputs).logits[:, -1]
    gate.train()
    with pruners.attach(model, gate):
        training = model(**inputs).logits[:, -1]
    assert torch.equal(training.detach(), inference)
    training.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in gate.named_parameters() if n != "scorer.out.bias"}  # a shift: no effect on a rank
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_llm_layer_gate_cuts_after_its_layer_and_batches_like_one_by_one(model):
    inputs = make_inputs(model, [3, 9], seed=1)
    gate = attached_gate(model, budget=16, layer=1)
    with torch.no_grad(), pruners.attach(model, gate) as report:
        model(**inputs)
    assert report.as_dict()["visual_tokens_per_layer"] == [64, 64, 16, 16]
    batched = generate_new_tokens(model, inputs, gate)
    for i in range(2):
        assert torch.equal(batched[i], generate_new_tokens(model, slice_inputs(inputs, i), gate)[0])


def test_an_untrained_attention_prior_gate_keeps_exactly_fastvs_tokens(model):
    """With the prior, the learned terms start at zero: the first ranking is FastV's (the last token's attention
    at the same layer), so the forward pass equals FastV's. In training the zero-initialised weights and the
    prior's scale get gradients (the others do once those have moved, as with LoRA's zero-initialised B)."""
    inputs = make_inputs(model, [3, 9], seed=6)
    gate = attached_gate(model, budget=16, layer=1, attention_prior=True, noise=0.0)
    with torch.no_grad(), pruners.attach(model, gate):
        gated = model(**inputs).logits
    with torch.no_grad(), pruners.attach(model, pruners.build("fastv", budget=16, k=2)):
        fastv = model(**inputs).logits
    assert torch.equal(gated, fastv)
    with torch.no_grad(), pruners.attach(model, attached_gate(model, budget=16, layer=1)):
        assert not torch.equal(model(**inputs).logits, fastv)  # without the prior: another choice
    gate.train()
    with pruners.attach(model, gate):
        model(**inputs).logits[:, -1].logsumexp(-1).sum().backward()
    grads = dict(gate.named_parameters())
    for name in ("scorer.prior_weight", "scorer.out.weight", "scorer.query.weight"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    assert sum(p.numel() for p in gate.parameters()) == parameter_count(64, 64, attention_prior=True)


@pytest.mark.parametrize(("kw", "message"), [
    ({"hidden": 0}, "hidden must be an int >= 1"), ({"temperature": 0.0}, "temperature must be a number > 0"),
    ({"noise": -1.0}, "noise must be a number >= 0"), ({"layer": -1}, "layer must be an int >= 0 or None"),
    ({"attention_prior": True}, "attention_prior reads the LLM's attention, so it needs an LLM layer"),
    ({"attention_prior": 1, "layer": 1}, "attention_prior must be True or False, got 1"),
])  # fmt: skip
def test_bad_arguments_name_the_value_and_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("gate", **kw)


def test_a_layer_past_the_model_is_refused_at_attach(model):
    with pytest.raises(ValueError, match=r"gate: layer 3 is out of range for a 4-layer LLM: allowed 0\.\.2"):
        attached_gate(model, layer=3)
    assert "forward" not in vars(model.model)


# ---------------------------------------------------------------- the checkpoint folder


def test_a_saved_gate_loads_by_path_with_the_same_weights_and_choices(model, tmp_path):
    gate = attached_gate(model, budget=16, hidden=32)
    save_pruner(tmp_path, gate, model_identity(model))
    loaded = pruners.build("gate", checkpoint=str(tmp_path))
    assert (loaded.hidden, loaded.dim, loaded.budget, loaded.training) == (32, 64, 16, False)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in gate.state_dict().items())
    inputs = make_inputs(model, [4, 6], seed=3)
    assert kept_slots(model, loaded, inputs) == kept_slots(model, gate, inputs)
    assert pruners.build("gate", checkpoint=str(tmp_path), budget=24).budget == 24  # given arguments override


def test_checkpoint_folder_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pruners.build("gate", checkpoint=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a learned-pruner checkpoint: no pruner.json"):
        pruners.build("gate", checkpoint=str(tmp_path / "empty"))


def test_identity_ignores_dtype_and_path_but_not_weights(model, tmp_path):
    from pruners.learned.checkpoint import identity_differences

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert identity_differences(model_identity(model), model_identity(reloaded)) == []
    assert identity_differences(model_identity(model), model_identity(make_llava(seed=1))) == [
        "other weights (model.vision_tower.embeddings.patch_embedding.weight differs)"
    ]


@pytest.mark.parametrize(("other", "message"), [
    (dict(seed=7), "other weights"), (dict(llm_layers=3), "llm_layers 3 .trained on 4."),
])  # fmt: skip
def test_a_folder_of_another_model_stops_at_attach(model, tmp_path, other, message):
    save_pruner(tmp_path, attached_gate(model), model_identity(model))
    gate = pruners.build("gate", checkpoint=str(tmp_path))
    stranger = make_llava(**other)
    with pytest.raises(ValueError, match=f"gate: checkpoint {tmp_path} was trained on LlavaForConditionalGeneration.*"
                                         f"this model differs: {message}"):
        with pruners.attach(stranger, gate):
            pass
    assert "forward" not in vars(stranger.model)


def lora_folder(model, path):
    """A gate checkpoint with a random (non-zero) LoRA adapter on q/v, and the model with that adapter in it."""
    adapted = make_llava(seed=0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), adapted.get_decoder())  # fmt: skip
    adapter = adapter_payload(adapted.get_decoder())
    save_pruner(path, attached_gate(model, budget=16), model_identity(model), adapter=adapter)
    return adapted


def test_the_adapter_is_in_the_model_while_attached_and_gone_after(tmp_path):
    model = make_llava(seed=0)
    adapted = lora_folder(model, tmp_path)
    gate = pruners.build("gate", checkpoint=str(tmp_path))
    bare = pruners.build("gate", checkpoint=str(tmp_path))
    bare.adapter = None  # the same gate without its adapter
    inputs = make_inputs(model, [4, 6])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modules = {k: type(m) for k, m in model.named_modules()}
    with torch.no_grad():
        with pruners.attach(adapted, bare):
            expected = adapted(**inputs).logits[:, -1]
        with pruners.attach(model, gate):
            got = model(**inputs).logits[:, -1]
        with pruners.attach(model, bare):
            without = model(**inputs).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-5)  # the saved adapter is the one the model was trained with
    assert not torch.allclose(got, without, atol=1e-3)  # and it is in use while attached
    assert {k: type(m) for k, m in model.named_modules()} == modules
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_runtime_hands_the_question_to_vision_output(model):
    """Signal "question": the LLM input embeddings of each sample's non-image, non-padding tokens, and the
    sample of each image row."""
    gate = attached_gate(model, budget=16)
    inputs = make_inputs(model, [3, 7], seed=6)
    seen = {}
    original = gate.scores

    def spy(state):
        seen.update(state.extras)
        return original(state)

    gate.scores = spy
    with torch.no_grad(), pruners.attach(model, gate):
        model(**inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert torch.equal(seen["text_row"], torch.tensor([0, 1]))
    assert torch.equal(seen["text_valid"], mask & (ids != model.config.image_token_id))
    assert torch.equal(seen["text_embeds"], model.get_input_embeddings()(ids))
