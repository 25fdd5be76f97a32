"""VTW (METHODS.md §6): later layers hold no visual token, logits equal a hand-built withdrawal, the K search."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import IMAGE_TOKEN, PAD, llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs

import pruners
import pruners.methods.vtw  # noqa: F401  (registers "vtw" until the methods package imports it)
from pruners.base import ModelInfo, Stage, TokenState
from pruners.methods.vtw import choose_k, default_k, k_for_budget, search_layers, withdrawal_kl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import vtw_find_k  # noqa: E402

NEW_TOKENS = 4
TINY = dict(visual_tokens=64, grid=(8, 8), vision_layers=3, vision_feature_layer=2, llm_layers=4)


def info(**changes) -> ModelInfo:
    return llava15_info(**changes)


built = functools.partial(setup_pruner, "vtw")


def generate(model, inputs, pruner=None, **kw) -> torch.Tensor:
    """The new tokens only (a sample that ends early is padded with PAD in a batch, shorter alone)."""
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **kw}
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, **kw)[:, width:]
        with pruners.attach(model, pruner):
            return model.generate(**inputs, **kw)[:, width:]


def same_generation(batched_row: torch.Tensor, alone_row: torch.Tensor) -> bool:
    n = alone_row.shape[0]
    return torch.equal(batched_row[:n], alone_row) and bool((batched_row[n:] == PAD).all())


# ---------------------------------------------------------------- the hook on a constructed state


def llm_state(layer: int) -> TokenState:
    """Two left-padded samples: 0 = [t v v v t t], 1 = [pad pad t v v t]."""
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    visual = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    origin = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 2, 3, 4, 5]])
    return TokenState(
        hidden=torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3),
        valid=valid,
        visual=visual,
        positions=positions,
        origin=origin,
        sizes=torch.ones(2, 6),
        stage=Stage.LLM_LAYER,
        layer=layer,
        grid=(1, 3),
        num_images=torch.ones(2, dtype=torch.long),
    )


def test_withdrawal_keeps_exactly_the_text_in_order_with_original_positions():
    pruner = built(info(**TINY), k=2)
    state = llm_state(layer=1)
    out = pruner.llm_layer(state)
    assert out.visual_count().tolist() == [0, 0]
    assert out.origin.tolist() == [[0, 4, 5], [-1, 2, 5]]
    assert out.valid.tolist() == [[True] * 3, [False, True, True]]
    assert out.positions.tolist() == [[0, 4, 5], [-1, 0, 3]]
    assert torch.equal(out.hidden[0], state.hidden[0, [0, 4, 5]])
    assert torch.equal(out.hidden[1, 1:], state.hidden[1, [2, 5]])


def test_other_layers_and_text_only_batches_are_left_alone():
    pruner = built(info(**TINY), k=2)
    state = llm_state(layer=0)
    assert pruner.llm_layer(state) is state
    text_only = llm_state(layer=1).replace(visual=torch.zeros(2, 6, dtype=torch.bool))
    assert pruner.llm_layer(text_only) is text_only


# ---------------------------------------------------------------- K, budgets, validation


def test_default_k_is_15_of_32_scaled_to_the_depth():
    assert default_k(32) == 15 and default_k(40) == 19 and default_k(4) == 2 and default_k(2) == 1
    for depth, k in ((32, 15), (4, 2), (16, 8)):
        pruner = built(info(llm_layers=depth))
        assert pruner.k == k and pruner.llm_layers == (k - 1,) and pruner.budget is None
    assert built(info(), k=31).llm_layers == (30,)
    assert built(info(**TINY), k=4).llm_layers == ()  # k = L withdraws nothing


def test_budget_is_the_layer_average_and_chooses_the_nearest_k():
    # LLaVA-1.5-7B: 18 visual tokens per layer on average per withdrawal step.
    for budget, k in ((64, 4), (128, 7), (192, 11), (288, 16), (576, 32)):
        pruner = built(info(), budget=budget)
        assert (pruner.k, pruner.layer_mean) == (k, k * 18), budget
    # Tiny (64 tokens, 4 layers): 16 per step; halves round up (8 -> k=1, 24 -> k=2).
    expected = {b: (b * 4 + 32) // 64 for b in range(8, 65)}
    for budget, k in expected.items():
        pruner = built(info(**TINY), budget=budget)
        assert pruner.k == k and pruner.layer_mean == 16 * k and pruner.budget == budget
    assert k_for_budget(7, 64, 4) == 0


def test_budget_below_half_a_step_is_raised_to_k1_with_a_warning():
    with pytest.warns(UserWarning, match="budget 7 .* k=1 of 4 layers"):
        pruner = built(info(**TINY), budget=7)
    assert pruner.k == 1 and pruner.layer_mean == 16
    with pytest.warns(UserWarning, match="budget 64 .* k=1 of 4 layers \\(144 visual"):
        assert built(info(llm_layers=4), budget=64).k == 1  # the 576-token, 4-layer demo model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be an int >= 1"),
        (dict(k=True), "k must be an int >= 1"),
        (dict(k=2.0), "k must be an int >= 1"),
        (dict(budget=64, k=4), "give budget \\(64\\) or k \\(4\\), not both"),
        (dict(budget=0), "budget must be at least 1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("vtw", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match="k=5 is out of range for a 4-layer decoder: allowed 1..4"):
        built(info(**TINY), k=5)
    with pytest.raises(ValueError, match="budget 65 is out of range .* allowed 1..64"):
        built(info(**TINY), budget=65)
    with pytest.raises(ValueError, match="decoder has 1 layer"):
        built(info(llm_layers=1))
    assert built(info(llm_layers=1), k=1).llm_layers == ()


def test_setup_again_on_another_model_starts_from_the_arguments():
    pruner = built(info(), budget=36)
    assert pruner.k == 2
    pruner.setup(info(**TINY))
    assert pruner.k == 2 and pruner.llm_layers == (1,) and pruner.layer_mean == 32
    explicit = built(info(), k=20)
    with pytest.raises(ValueError, match="k=20 is out of range"):
        explicit.setup(info(**TINY))
    default = built(info())
    default.setup(info(**TINY))
    assert default.k == 2


# ---------------------------------------------------------------- K search pieces


def test_choose_k_takes_the_first_k_under_eta_not_the_last_above():
    table = {5: 0.2, 6: 0.01, 7: 0.003, 8: 0.004, 9: 0.0001, 10: 0.0}
    assert choose_k(table, 0.003) == 7  # inclusive; 8 above eta later does not matter
    assert choose_k(table, 0.0029) == 9
    assert choose_k(dict(reversed(table.items())), 0.005) == 7  # order of the table is irrelevant
    assert choose_k({5: 0.1, 6: 0.2}, 0.003) is None
    assert choose_k({}, 0.003) is None
    for bad in (-1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="eta must be a number >= 0"):
            choose_k(table, bad)


def test_withdrawal_kl_is_kl_of_withdrawn_from_full():
    p_full = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    p_w = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.2, 0.7]])
    got = withdrawal_kl(p_full.log() + 3.0, p_w.log() - 1.0)  # logits up to a constant
    hand = 0.2 * math.log(0.2 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.6 * math.log(0.6 / 0.2)
    assert got[0].item() == pytest.approx(hand, abs=1e-6) and got[1].abs() < 1e-6
    # The official KLDivLoss(log p_full, p_withdrawn), batchmean over a batch of one.
    official = torch.nn.functional.kl_div(p_full[:1].log(), p_w[:1], reduction="batchmean")
    assert torch.allclose(got[0], official, atol=1e-6)
    reverse = withdrawal_kl(p_w.log(), p_full.log())
    assert not torch.allclose(reverse[0], got[0], atol=1e-3)  # the direction matters


def test_search_layers_start_at_5_of_32_scaled():
    assert search_layers(32) == tuple(range(5, 32))
    assert search_layers(4) == (1, 2, 3) and search_layers(16) == tuple(range(2, 16))
    assert search_layers(32, start=20) == tuple(range(20, 32))
    for start in (0, 32):
        with pytest.raises(ValueError, match="allowed 1..31"):
            search_layers(32, start)


# ---------------------------------------------------------------- end to end on the tiny model


def run(model, inputs, pruner, **kw):
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        out = model(**inputs, use_cache=True, **kw)
    return out, report.as_dict()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_layers_from_k_hold_no_visual_token_nor_cache_entry(tiny_llava, k):
    inputs = make_inputs(tiny_llava, [5])
    out, stats = run(tiny_llava, inputs, pruners.build("vtw", k=k))
    assert stats["visual_tokens_per_layer"] == [64] * k + [0] * (4 - k)
    assert stats["visual_tokens"] == 0 and stats["visual_tokens_layer_mean"] == 16 * k
    length = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [length] * k + [length - 64] * (4 - k)
    per_layer = stats["kv_cache_bytes_per_layer"]
    assert per_layer[k] * length == per_layer[0] * (length - 64)


def test_budget_32_report_on_the_tiny_model(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 9])
    with torch.no_grad(), pruners.attach(tiny_llava, pruners.build("vtw", budget=32)) as report:
        tiny_llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = report.as_dict()
    assert stats["visual_tokens"] == 0 and stats["visual_tokens_layer_mean"] == 32
    assert stats["visual_tokens_llm_input"] == 64 and stats["visual_tokens_per_layer"] == [64, 64, 0, 0]


def withdrawn_reference(model, inputs: dict, k: int, renumber: bool = False) -> torch.Tensor:
    """Logits of one unpadded sample with the visual tokens cut by hand before layer k.

    Layers 0..k-1: the unpruned model (its hidden state k is the input of layer k). Layers k..L-1:
    the model's own layer modules run here on the text tokens with their original positions.
    """
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[k]
        text = inputs["input_ids"][0] != IMAGE_TOKEN
        h = hidden[:, text]
        n = h.shape[1]
        positions = torch.arange(n)[None] if renumber else torch.arange(len(text))[text][None]
        lm = model.model.language_model
        cos, sin = lm.rotary_emb(h, position_ids=positions)
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        for layer in lm.layers[k:]:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
        return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_logits_equal_a_hand_built_withdrawal(tiny_llava, k):
    inputs = make_inputs(tiny_llava, [4, 9], seed=2)
    out, _ = run(tiny_llava, inputs, pruners.build("vtw", k=k))
    for i in range(2):
        alone = slice_inputs(inputs, i)
        ref = withdrawn_reference(tiny_llava, alone, k)[0]
        real = inputs["attention_mask"][i].bool()
        text = real & (inputs["input_ids"][i] != IMAGE_TOKEN)
        got = out.logits[i, text]
        assert (got - ref).abs().max() <= 2e-5, f"k={k}, sample {i}"
        assert (out.logits[i, real & ~text] == 0).all()  # withdrawn slots carry no output
        # The reference is sensitive to positions: renumbering the text would change the logits.
        assert (withdrawn_reference(tiny_llava, alone, k, renumber=True)[0] - ref).abs().max() > 1e-3


def test_k_equal_to_depth_and_full_budget_are_the_unpruned_model(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    with torch.no_grad():
        ref = tiny_llava(**inputs).logits
    real = inputs["attention_mask"].bool()
    for pruner in (pruners.build("vtw", k=4), pruners.build("vtw", budget=64), pruners.build("vtw", budget=56)):
        out, stats = run(tiny_llava, inputs, pruner)
        assert pruner.llm_layers == () and (out.logits - ref)[real].abs().max() <= 1e-5
        assert stats["visual_tokens"] == 64 and stats["visual_tokens_layer_mean"] == 64
    assert torch.equal(generate(tiny_llava, inputs, pruners.build("vtw", budget=64)), generate(tiny_llava, inputs))


@pytest.mark.parametrize("kwargs", [dict(budget=32), dict(k=1)])
def test_batched_generation_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [2, 9, 5], seed=4)
    batched = generate(tiny_llava, inputs, pruners.build("vtw", **kwargs))
    for i in range(3):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("vtw", **kwargs))
        assert same_generation(batched[i], alone[0]), f"sample {i}"


def test_decoding_on_the_withdrawn_cache_equals_recomputing_the_withdrawn_prefill(tiny_llava):
    """The text-only caches of layers >= k hold exactly what a fresh withdrawn prefill would compute."""
    inputs = make_inputs(tiny_llava, [3, 7], seed=5)
    cached = generate(tiny_llava, inputs, pruners.build("vtw", k=2))
    recomputed = generate(tiny_llava, inputs, pruners.build("vtw", k=2), use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad(), pruners.attach(tiny_llava, pruners.build("vtw", k=2)):
        out = tiny_llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN)).sum(-1)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    width = inputs["input_ids"].shape[1]
    steps = out.sequences.shape[1] - width
    # Left-padded to the longest text; the last generated token is not in the cache yet.
    assert lengths == [width + steps - 1] * 2 + [int(text.max()) + steps - 1] * 2


def test_several_images_per_sample_are_all_withdrawn():
    model = make_llava(seed=1)
    inputs = make_inputs(model, [3, 6], images_per_sample=2)
    _, stats = run(model, inputs, pruners.build("vtw", budget=32))
    assert stats["visual_tokens_per_layer"] == [128, 128, 0, 0] and stats["visual_tokens_layer_mean"] == 64
    batched = generate(model, inputs, pruners.build("vtw", budget=32))
    for i in range(2):
        alone = generate(model, slice_inputs(inputs, i, images_per_sample=2), pruners.build("vtw", budget=32))
        assert same_generation(batched[i], alone[0])


# ---------------------------------------------------------------- the K search script


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from data.tiny_llava import write_tiny_dataset, write_tiny_llava

    root = tmp_path_factory.mktemp("vtw")
    write_tiny_llava(root / "model", image_size=112, vision_layers=3)
    write_tiny_dataset(root / "data", n=3, image_size=112)
    return root


def test_find_k_on_shapes_picks_the_first_k_under_eta_and_writes_a_config(tiny_folder, capsys):
    config = tiny_folder / "vtw.yaml"
    result = vtw_find_k.main(
        ["--model", str(tiny_folder / "model"), "--n", "2", "--eta", "1.0", "--device", "cpu", "--config", str(config)]
    )
    assert set(result["kl"]) == {1, 2, 3} and result["num_questions"] == 2 and result["llm_layers"] == 4
    assert all(v >= 0 for v in result["kl"].values())
    assert result["k"] == choose_k(result["kl"], 1.0) == 1
    out = capsys.readouterr().out
    assert "KL(withdrawn||full)" in out and "<- chosen" in out and "k = 1 (layer-average 16" in out
    init = yaml.safe_load(config.read_text())["model"]["pruner"]
    assert init["class_path"] == "vtw" and init["init_args"] == {"budget": None, "k": 1}
    assert pruners.build("vtw", **init["init_args"]).k == 1


def test_find_k_on_a_jsonl_folder_is_batch_invariant_and_reports_no_k(tiny_folder, capsys):
    common = [
        "--model",
        str(tiny_folder / "model"),
        "--data",
        str(tiny_folder / "data"),
        "--n",
        "3",
        "--device",
        "cpu",
        "--eta",
        "0",
        "--config",
        str(tiny_folder / "none.yaml"),
    ]
    one = vtw_find_k.main(common)
    three = vtw_find_k.main(common + ["--batch-size", "3"])
    assert one["k"] is None and not (tiny_folder / "none.yaml").exists()
    assert "no K in 1..3 meets eta=0" in capsys.readouterr().out
    for k in (1, 2, 3):
        assert three["kl"][k] == pytest.approx(one["kl"][k], rel=1e-3, abs=1e-7)
    # KL at k is the per-question mean of withdrawal_kl, computed here directly for one K.
    pairs = vtw_find_k.load_questions(str(tiny_folder / "data"), 3)
    model, processor = vtw_find_k.load_model_and_processor(str(tiny_folder / "model"))
    full = vtw_find_k.next_token_logits(model, processor, pairs, "{question}")
    cut = vtw_find_k.next_token_logits(model, processor, pairs, "{question}", pruners.build("vtw", k=2))
    assert withdrawal_kl(full, cut).mean().item() == pytest.approx(one["kl"][2], rel=1e-3, abs=1e-7)
