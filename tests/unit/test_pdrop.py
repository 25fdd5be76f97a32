"""PDrop (PyramidDrop): last-instruction-token scoring, pyramid counts per stage, layer mapping, end to end."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import IMAGE_TOKEN, generate_new_tokens, llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs

import pruners
import pruners.methods.pdrop  # noqa: F401  (registers "pdrop" until the package imports it)
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.pdrop import geometric_counts, paper_counts

NEW_TOKENS = 4
built = functools.partial(setup_pruner, "pdrop")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def info(visual_tokens: int = 576, **changes) -> ModelInfo:
    return llava15_info(visual_tokens=visual_tokens, **changes)


# ---------------------------------------------------------------- constructed LLM states


def llm_state(
    rows: torch.Tensor, pads: list[int], layer: int, images: list[int] | None = None
) -> tuple[TokenState, list]:
    """A left-padded batch: sample b = pads[b] padding slots, 2 + max(pads) - pads[b] system tokens, V visual
    tokens, 3 text tokens (so every sample ends in the last slot).

    `rows` (B, V) is the attention the LAST token pays to the visual tokens; every other query row
    pays the reverse ranking, so a pruner that reads any other row keeps other tokens.
    """
    bsz, v = rows.shape
    n = max(pads) + 2 + v + 3
    attn = torch.zeros(bsz, n, n)
    valid = torch.zeros(bsz, n, dtype=torch.bool)
    visual = torch.zeros(bsz, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        first = n - 3 - v  # first visual slot
        valid[b, pad:] = True
        visual[b, first : first + v] = True
        attn[b, :, first : first + v] = -rows[b]  # every row: reversed ranking
        attn[b, -1, first : first + v] = rows[b]  # the last token's row
    slots = torch.arange(n)
    calls = []

    def probe(query_index, heads="mean", logits=False):
        calls.append((query_index.tolist(), heads, logits))
        return torch.gather(attn, 1, query_index[..., None].expand(-1, -1, n))

    pad = torch.tensor(pads)[:, None]
    state = TokenState(
        hidden=torch.randn(bsz, n, 4),
        valid=valid,
        visual=visual,
        positions=torch.where(valid, slots - pad, 0),
        origin=torch.where(valid, slots, -1),
        sizes=valid.float(),
        stage=Stage.LLM_LAYER,
        layer=layer,
        grid=(24, 24),
        num_images=torch.tensor(images or [1] * bsz),
        probe=probe,
    )
    return state, calls


def kept_visual(out: TokenState, state: TokenState, b: int = 0) -> list[int]:
    """Visual tokens of sample b kept in `out`, as column numbers j of `state`'s visual block."""
    first = int(state.visual[b].nonzero()[0])
    return (out.origin[b][out.visual[b] & out.valid[b]] - first).tolist()


def test_kept_tokens_are_the_top_of_the_last_instruction_tokens_attention():
    row = torch.tensor([[0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.03, 0.14]])
    pruner = built(info(8))  # paper schedule on 8 tokens: 4 -> 2 -> 1
    state, calls = llm_state(row, [0], layer=8)  # a hook before layer 8, the first of stage 2
    out = pruner.llm_layer(state)
    assert calls == [([[12]], "mean", False)]  # one query row: the last slot, head mean, probabilities
    assert kept_visual(out, state) == [1, 3, 5, 7]  # top 4 of the row, in their original order
    text = ~out.visual[0] & out.valid[0]
    assert out.origin[0][text].tolist() == [0, 1, 10, 11, 12]  # every text token stays
    last, _ = llm_state(row, [0], layer=24)
    assert kept_visual(pruner.llm_layer(last), last) == [1]  # the last stage keeps 1
    assert pruner.llm_layer(llm_state(row, [0], layer=9)[0]).num_tokens == 13  # not a stage start: untouched


def test_each_sample_of_a_padded_batch_ranks_its_own_last_row():
    rows = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6], [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    state, calls = llm_state(rows, [3, 0], layer=8)
    out = built(info(8)).llm_layer(state)
    assert calls[0][0] == [[15], [15]]  # the last slot of each sample
    assert kept_visual(out, state, 0) == [1, 3, 5, 7] and kept_visual(out, state, 1) == [0, 2, 4, 6]
    assert out.valid.sum(-1).tolist() == [2 + 4 + 3, 5 + 4 + 3]


def test_a_sample_with_two_images_keeps_count_times_images():
    state, _ = llm_state(torch.arange(16.0)[None], [0], layer=8, images=[2])
    out = built(info(8)).llm_layer(state)
    assert kept_visual(out, state) == list(range(8, 16))  # 2 x 4, chosen jointly over both images


def run_stages(pruner, n: int) -> list[int]:
    """Feed a fresh state of the survivors to every stage; visual counts after each."""
    counts = []
    for layer in pruner.llm_layers:
        state, _ = llm_state(torch.rand(1, n), [0], layer=layer)
        n = int(pruner.llm_layer(state).visual_count())
        counts.append(n)
    return counts


@pytest.mark.parametrize(
    "kwargs, counts",
    [
        ({}, [288, 144, 72]),  # the paper: lambda = 0.5
        ({"lam": 0.4}, [230, 92, 36]),  # floor(576 * 0.4 ** s)
        ({"image_token_ratio_list": [1.0, 0.5, 0.25, 0.125]}, [288, 144, 72]),  # official scripts' form
        ({"budget": 64}, [277, 133, 64]),  # round(576 * (64 / 576) ** (s / 3))
        ({"budget": 128}, [349, 211, 128]),
        ({"budget": 192}, [399, 277, 192]),
        ({"budget": 576}, [576, 576, 576]),  # keep everything
    ],
)
def test_counts_per_stage_follow_the_pyramid(kwargs, counts):
    pruner = built(info(), **kwargs)
    assert pruner.llm_layers == (8, 16, 24)  # hooks before layers 8, 16, 24, the first with fewer tokens
    assert run_stages(pruner, 576) == counts == list(pruner.stage_counts)
    assert pruner.budget == counts[-1]


def test_geometric_counts_never_increase_and_end_at_the_budget():
    for budget in range(1, 577):
        counts = geometric_counts(576, budget, 3)
        assert counts[-1] == budget and all(a >= b >= budget for a, b in zip(counts, counts[1:]))
    assert geometric_counts(64, 8, 3) == (32, 16, 8) == paper_counts(64, (0.5, 0.25, 0.125))


def test_keep_everything_budget_makes_no_cut():
    state, calls = llm_state(torch.rand(1, 8), [0], layer=7)
    assert built(info(8), budget=8).llm_layer(state) is state and calls == []


@pytest.mark.parametrize(
    "depth, scoring, layers, counts",
    [
        (32, "stage_end", (7, 15, 23), (32, 16, 8)),
        (32, "official", (8, 16, 24), (32, 16, 8)),
        (4, "stage_end", (0, 1, 2), (32, 16, 8)),  # first shorter layers 1, 2, 3
        (4, "official", (1, 2, 3), (32, 16, 8)),  # hooks before layers 1, 2, 3
        (2, "stage_end", (0,), (8,)),  # first shorter layer 1 for every stage: the deepest count wins
        (2, "official", (1,), (8,)),
    ],
)
def test_layer_list_scales_to_the_decoder_depth(depth, scoring, layers, counts):
    pruner = built(info(64, llm_layers=depth), scoring_layer=scoring)
    assert pruner.llm_layers == layers and pruner.stage_counts == counts
    assert pruner.llm_hook_point == ("pre" if scoring == "official" else "block")
    budget = built(info(64, llm_layers=depth), scoring_layer=scoring, budget=8)
    assert budget.llm_layers == layers and budget.stage_counts[-1] == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, r"budget must be at least 1, got 0"),
        ({"layer_list": []}, r"layer_list must be a non-empty, strictly increasing list of ints in 1..31"),
        ({"layer_list": (16, 8, 24)}, r"strictly increasing .* got \(16, 8, 24\)"),
        ({"layer_list": (0, 8)}, r"ints in 1..31 .* got \(0, 8\)"),
        ({"layer_list": (8, 32)}, r"ints in 1..31 .* got \(8, 32\)"),
        ({"image_token_ratio_list": (0.5, 0.25)}, r"must hold 3 non-increasing numbers in \(0, 1\]"),
        ({"image_token_ratio_list": (0.5, 0.6, 0.1)}, r"non-increasing .* got \(0.5, 0.6, 0.1\)"),
        ({"image_token_ratio_list": (0.5, 0.25, 0.0)}, r"in \(0, 1\]"),
        ({"lam": 1.0}, r"lam \(the paper's lambda\) must be a number in \(0, 1\), got 1.0"),
        ({"lam": 0.5, "image_token_ratio_list": (0.5, 0.25, 0.1)}, r"give lam or image_token_ratio_list, not both"),
        ({"budget": 64, "lam": 0.5}, r"budget 64 sets its own geometric schedule; .* allowed only with budget=None"),
        ({"scoring_layer": "next"}, r"scoring_layer must be one of \('official', 'stage_end'\), got 'next'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("pdrop", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match=r"budget 577 is out of range.*allowed 1..576"):
        built(info(), budget=577)
    with pytest.raises(ValueError, match=r"decoder has 1 layer\(s\); allowed: at least 2"):
        built(info(llm_layers=1))
    with pytest.raises(ValueError, match=r"ratio 0.01 keeps no image token of 64; allowed ratios >= 0.015625"):
        built(info(64), image_token_ratio_list=(0.5, 0.1, 0.01))


# ---------------------------------------------------------------- end to end on the tiny model


generate = functools.partial(generate_new_tokens, new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("kwargs", [{"budget": 32}, {}, {"budget": 32, "scoring_layer": "stage_end"}])
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, pruners.build("pdrop", **kwargs))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("pdrop", **kwargs))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


@pytest.mark.parametrize(
    "kwargs, per_layer",
    [
        ({"budget": 32}, [64, 51, 40, 32]),  # geometric 64 -> 32 over 3 stages
        ({"budget": 32, "scoring_layer": "stage_end"}, [64, 51, 40, 32]),  # the same cuts, scored a layer earlier
        ({}, [64, 32, 16, 8]),  # paper: lambda = 0.5
    ],
)
def test_budget_is_met_exactly(tiny_llava, kwargs, per_layer):
    pruner = pruners.build("pdrop", **kwargs)
    _, stats = generate(tiny_llava, make_inputs(tiny_llava, [3, 9]), pruner, report=True)
    assert stats["visual_tokens"] == pruner.budget == per_layer[-1]
    assert stats["visual_tokens_per_layer"] == per_layer


def test_paper_schedule_on_a_32_layer_decoder_gives_the_paper_layer_mean():
    model = make_llava(llm_layers=32)
    _, stats = generate(model, make_inputs(model, [4]), pruners.build("pdrop"), report=True)
    assert stats["visual_tokens_per_layer"] == [64] * 8 + [32] * 8 + [16] * 8 + [8] * 8
    assert stats["visual_tokens_layer_mean"] == 30  # (8 * 64 + 8 * 32 + 8 * 16 + 8 * 8) / 32, 270 on 576


@pytest.mark.parametrize("scoring", ["stage_end", "official"])
def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava, scoring):
    inputs = make_inputs(tiny_llava, [3, 8])
    full = pruners.build("pdrop", budget=64, scoring_layer=scoring)
    assert torch.equal(generate(tiny_llava, inputs, full), generate(tiny_llava, inputs))


@pytest.mark.parametrize("scoring, layer", [("stage_end", 0), ("official", 1)])
def test_first_cut_keeps_the_top_of_the_eager_last_token_attention(scoring, layer):
    """Against HF's own eager attention weights of the unpruned model: the first stage keeps the image tokens
    with the highest head-mean attention from the last prompt token, at the scoring layer; later stages see
    contiguous (renumbered) positions."""
    model = make_llava(attn="eager")
    inputs = slice_inputs(make_inputs(model, [5]), 0)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer][0].mean(0)[-1]  # (L,)
    image = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[:, 0]
    expected = image[attn[image].topk(32).indices].sort().values
    pruner = pruners.build("pdrop", scoring_layer=scoring)
    seen, llm_layer = [], pruner.llm_layer

    def spy(state):
        seen.append((state, llm_layer(state)))
        return seen[-1][1]

    pruner.llm_layer = spy
    with torch.no_grad(), pruners.attach(model, pruner):
        model(**inputs)
    first_out = seen[0][1]
    assert first_out.origin[0][first_out.visual[0]].tolist() == expected.tolist()
    second_in = seen[1][0]
    assert second_in.positions[0].tolist() == list(range(second_in.num_tokens))
