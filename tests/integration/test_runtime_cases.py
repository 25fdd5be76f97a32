"""Runtime cases beyond the oracles: text-only input, several images, renumbered positions, bad hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_llava, slice_inputs

import pruners
from pruners.base import Pruner, Stage
from pruners.ops import compact_index


def greedy(model, inputs, pruner, n=4):
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, -n:]
    return out, report.as_dict()


def test_text_only_input_matches_hf(tiny_llava):
    inputs = make_inputs(tiny_llava, [4, 7])
    text = inputs["input_ids"].clone()
    text[text == tiny_llava.config.image_token_id] = 5
    batch = {"input_ids": text, "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        ref = tiny_llava.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    out, stats = greedy(tiny_llava, batch, pruners.build("fastv", budget=8))
    assert torch.equal(out, ref)
    assert stats["visual_tokens"] == 0


@pytest.mark.parametrize("name", ["fastv", "pool"])
def test_two_images_per_sample_batched_equals_alone(tiny_llava, name):
    inputs = make_inputs(tiny_llava, [3, 8], images_per_sample=2)
    batched, stats = greedy(tiny_llava, inputs, pruners.build(name, budget=16))
    assert stats["visual_tokens"] == 32  # budget per image
    for i in range(2):
        alone, _ = greedy(tiny_llava, slice_inputs(inputs, i, images_per_sample=2), pruners.build(name, budget=16))
        assert torch.equal(batched[i], alone[0])


def test_image_count_mismatch_is_a_clear_error(tiny_llava):
    inputs = make_inputs(tiny_llava, [3])
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="hold 64 image tokens for 2 image"):
        greedy(tiny_llava, inputs, pruners.build("none"))


class DropAllVisual(Pruner):
    """Test pruner: after layer 0 drop every visual token, renumbering positions contiguously."""

    name = "test-drop-all"
    stages = frozenset({Stage.LLM_LAYER})
    renumber_positions = True

    def __init__(self):
        super().__init__()
        self.llm_layers = (0, 1)
        self.positions = None

    def llm_layer(self, state):
        if state.layer == 1:
            self.positions = state.positions.clone(), state.valid.clone()
            return state
        return state.keep(compact_index(state.valid & ~state.visual))


def test_renumbered_positions_are_contiguous():
    model = make_llava(seed=4)
    inputs = make_inputs(model, [3, 6])
    pruner = DropAllVisual()
    out, stats = greedy(model, inputs, pruner)
    positions, valid = pruner.positions
    for b in range(2):
        assert positions[b][valid[b]].tolist() == list(range(int(valid[b].sum())))
    assert stats["visual_tokens_per_layer"] == [64, 0, 0, 0]
    assert out.shape == (2, 4)


class DropOddVisual(Pruner):
    """Test pruner: after layer 0 drop every other visual token; records extras["input_embeds"] at layers 0 and 1."""

    name = "test-drop-odd"
    stages = frozenset({Stage.LLM_LAYER})

    def __init__(self):
        super().__init__()
        self.llm_layers = (0, 1)
        self.seen = {}

    def llm_layer(self, state):
        self.seen[state.layer] = (state.extras["input_embeds"].clone(), state.origin.clone(), state.valid.clone())
        if state.layer == 1:
            return state
        odd = state.visual & (state.visual.long().cumsum(-1) % 2 == 0)
        return state.keep(compact_index(state.valid & ~odd))


def test_input_embeddings_follow_their_tokens_through_cuts():
    model = make_llava(seed=4)
    inputs = make_inputs(model, [3, 6])
    pruner = DropOddVisual()
    greedy(model, inputs, pruner, n=1)
    first, origin0, valid0 = pruner.seen[0]
    ids = inputs["input_ids"]
    text = valid0 & (ids != model.config.image_token_id)
    assert torch.equal(first[text], model.get_input_embeddings()(ids)[text])  # no vision cut: slot = origin
    later, origin1, valid1 = pruner.seen[1]
    assert later.shape[1] == first.shape[1] - 32
    assert torch.equal(later[valid1], first.gather(1, origin1.clamp(min=0)[..., None].expand_as(later))[valid1])
    assert (later[~valid1] == 0).all()


class HalveAtInput(Pruner):
    """Test pruner: keep the first half of each image's tokens before the LLM; record positions at layer 0."""

    name = "test-halve"
    stages = frozenset({Stage.VISION_OUTPUT, Stage.LLM_LAYER})
    renumber_positions = True

    def __init__(self):
        super().__init__()
        self.llm_layers = (0,)
        self.positions = None

    def vision_output(self, state):
        return state.keep(compact_index(state.valid & (state.positions < 32)))

    def llm_layer(self, state):
        self.positions = state.positions.clone(), state.valid.clone()
        return state


def test_a_vision_stage_cut_is_renumbered_at_the_llm_input():
    model = make_llava(seed=4)
    inputs = make_inputs(model, [3, 6])
    pruner = HalveAtInput()
    greedy(model, inputs, pruner, n=2)
    positions, valid = pruner.positions
    for b in range(2):
        kept = positions[b][valid[b]].tolist()
        assert kept == list(range(kept[0], kept[0] + len(kept)))  # no gap where 32 image tokens went


def test_hooks_outside_the_model_are_rejected(tiny_llava):
    bad = DropAllVisual()
    bad.llm_layers = (3,)
    with pytest.raises(ValueError, match=r"LLM layer hooks \[3\] out of range: allowed 0\.\.2"):
        with pruners.attach(tiny_llava, bad):
            pass


class ProtectEvery7th(Pruner):
    """Test pruner: marks patches 0, 7, 14, ... protected at VISION_OUTPUT (after dropping patch 1,
    so flags must follow tokens, not slots) and records, at LLM layer 0, the image index of every
    visual token flagged there."""

    name = "test-protect"
    stages = frozenset({Stage.VISION_OUTPUT, Stage.LLM_LAYER})

    def __init__(self) -> None:
        super().__init__()
        self.llm_layers = (0,)

    def vision_output(self, state):
        state = state.keep(compact_index(state.valid & (state.positions != 1)))
        return state.replace(protected=(state.positions % 7 == 0) & state.valid)

    def llm_layer(self, state):
        first = torch.where(state.visual, state.origin, state.origin.max() + 1).amin(-1, keepdim=True)
        flagged = state.protected & state.visual
        self.seen = [sorted((state.origin[b] - first[b])[flagged[b]].tolist()) for b in range(state.batch_size)]
        return state


def test_protected_flags_follow_their_tokens_into_the_llm(tiny_llava):
    pruner = ProtectEvery7th()
    with torch.no_grad(), pruners.attach(tiny_llava, pruner):
        tiny_llava(**make_inputs(tiny_llava, [3, 9]))
    # Image slots are consecutive, and patch 1 is gone, so patch p > 1 sits at image index p.
    assert pruner.seen == [list(range(0, 64, 7))] * 2
