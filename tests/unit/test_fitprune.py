"""FitPrune: c * s deletion on constructed attention, recipes and budget mode, the offline search
(prefixes, FLOPs stop rule, binary search, the script on a tiny model folder), end to end."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import generate_new_tokens, llava15_info, make_inputs, make_llava, setup_pruner, slice_inputs

import pruners
from pruners.base import Stage, TokenState
from pruners.flops import DecoderShape, llama_layer_macs
from pruners.methods import fitprune  # noqa: F401  (registers "fitprune")
from pruners.methods.fitprune import OFFICIAL_RECIPES, distribute, map_depth, nearest_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import fitprune_recipe  # noqa: E402

NEW_TOKENS = 4
built = functools.partial(setup_pruner, "fitprune")
TINY = dict(visual_tokens=64, grid=(8, 8), llm_layers=4)

# Six visual tokens j0..j5. Cross score c_j (per text row) and the image's summed attention to j.
CROSS = [0.30, 0.10, 0.40, 0.05, 0.50, 0.20]
SELF_SUM = [1.2, 0.6, 0.3, 1.8, 0.06, 0.9]  # s_j = SELF_SUM / 6 = .2 .1 .05 .3 .01 .15
# c * s = .06 .01 .02 .015 .005 .03: ascending j4, j1, j3, j2, j5, j0. The smallest c alone are j3, j1 and
# the smallest s alone j4, j2: only the product deletes j4 then j1 then j3.


def llm_state(pad: int = 0, layer: int = 1, images: int = 1) -> tuple[TokenState, list]:
    """`pad` padding slots, 2 system tokens, visual j0..j5 (slots 2..7), 3 text tokens (8..10).

    The fake probe returns a fixed attention matrix: each text row gives CROSS[j] to j, each visual row
    SELF_SUM[j] / 6; the system rows put a large weight on j1 and j4 (they must not count)."""
    n = pad + 11
    attn = torch.zeros(n, n)
    attn[pad + 8 :, pad + 2 : pad + 8] = torch.tensor(CROSS)
    attn[pad + 2 : pad + 8, pad + 2 : pad + 8] = torch.tensor(SELF_SUM) / 6
    attn[pad : pad + 2, [pad + 3, pad + 6]] = 5.0
    attn[:pad] = float("nan")  # padding rows must never be read
    slots = torch.arange(n)
    valid = slots >= pad
    calls = []

    def probe(query_index, heads="mean", logits=False):
        calls.append((query_index.clone(), heads, logits))
        return attn[query_index]

    state = TokenState(
        hidden=torch.randn(1, n, 4), valid=valid[None], visual=((slots >= pad + 2) & (slots < pad + 8))[None],
        positions=torch.where(valid, slots - pad, 0)[None], origin=torch.where(valid, slots, -1)[None],
        sizes=torch.ones(1, n), stage=Stage.LLM_LAYER, layer=layer, grid=(24, 24),
        num_images=torch.full((1,), images), probe=probe,
    )  # fmt: skip
    return state, calls


def kept_visual(state: TokenState) -> list[int]:
    vis = state.visual[0] & state.valid[0]
    first = int(state.origin[0][state.valid[0]][0])
    return (state.origin[0][vis] - first - 2).tolist()


# ---------------------------------------------------------------- inference: the defining property


@pytest.mark.parametrize("k, deleted", [(1, [4]), (2, [4, 1]), (3, [4, 1, 3]), (5, [4, 1, 3, 2, 5])])
def test_deletes_exactly_the_k_smallest_cross_times_self(k, deleted):
    pruner = built(llava15_info(**TINY), recipe=[0, k, 0, 0])
    assert pruner.schedule == [0, k, 0, 0] and pruner.llm_layers == (1,)
    state, calls = llm_state()
    assert kept_visual(pruner.llm_layer(state)) == sorted(set(range(6)) - set(deleted))
    # Rows: the visual and text slots only (not the system prompt), head MAX, probabilities.
    assert [c[0].tolist() for c in calls] == [[list(range(2, 11))]] and calls[0][1:] == ("max", False)
    padded, _ = llm_state(pad=3)
    assert kept_visual(pruner.llm_layer(padded)) == sorted(set(range(6)) - set(deleted))


def test_scores_are_text_sum_and_image_mean():
    cross, self_score, text = fitprune.attention_scores(llm_state(pad=2)[0])
    assert torch.allclose(cross[0, 4:10], 3 * torch.tensor(CROSS))
    assert torch.allclose(self_score[0, 4:10], torch.tensor(SELF_SUM) / 6)
    assert text.tolist() == [3]


def test_other_layers_and_images_per_sample():
    pruner = built(llava15_info(**TINY), recipe=[0, 2, 0, 0])
    state, calls = llm_state(layer=2)
    assert pruner.llm_layer(state) is state and calls == []  # no deletion at this layer: untouched
    assert kept_visual(pruner.llm_layer(llm_state(images=2)[0])) == [0, 5]  # 2 per image, 2 images


# ---------------------------------------------------------------- recipes, presets, budget mode


def test_official_presets_and_depth_mapping():
    assert OFFICIAL_RECIPES[50][2] == 49 and OFFICIAL_RECIPES[50][6] == 59  # METHODS.md §6
    assert OFFICIAL_RECIPES[90][:3] == (262, 153, 80)
    assert all(len(r) == 32 and r[31] == 0 for r in OFFICIAL_RECIPES.values())
    assert built(llava15_info()).schedule == list(OFFICIAL_RECIPES[60])  # default: the eval script's rho 60
    assert built(llava15_info(), preset=90).schedule == list(OFFICIAL_RECIPES[90])
    p = OFFICIAL_RECIPES[60]
    # 4 layers: l -> round(l / 8): 0..4 -> 0, 5..11 -> 1, 12..19 -> 2, 20..31 -> 3, and 3 (last) folds into 2.
    assert map_depth(p, 4) == [sum(p[0:5]), sum(p[5:12]), sum(p[12:32]), 0]
    assert map_depth([1, 2, 3], 3) == [1, 5, 0]  # the last layer's count moves to the one before
    # A 576-token preset on 64 tokens deletes round(449 * 64 / 576) = 50 in the mapped proportions.
    assert sum(built(llava15_info(**TINY)).schedule) == 50


def test_distribute_is_cumulative_rounding_with_an_exact_total():
    assert distribute([1, 1, 1], 4) == [1, 2, 1]  # marks round(4/3)=1, round(8/3)=3, 4
    assert distribute([5, 0, 3], 8) == [5, 0, 3]  # already summing to the total: unchanged
    assert distribute([2, 1], 0) == [0, 0]


@pytest.mark.parametrize("budget, preset", [(64, 80), (128, 60), (192, 50)])
def test_budget_scales_the_nearest_preset_to_delete_n_minus_budget(budget, preset):
    assert nearest_preset(budget, 576) == preset  # final counts 62, 127, 173 of the official recipes
    pruner = built(llava15_info(), budget=budget)
    assert sum(pruner.schedule) == 576 - budget
    assert pruner.schedule == distribute(OFFICIAL_RECIPES[preset], 576 - budget)
    shaped = built(llava15_info(), budget=budget, recipe=[1, 0, 3] + [0] * 29)  # a given recipe is the shape
    assert shaped.schedule == distribute([1, 0, 3], 576 - budget) + [0] * 29
    assert built(llava15_info(), budget=budget, recipe=[1, 3]).schedule[::16] == distribute([1, 3], 576 - budget)


@pytest.mark.parametrize("budget", range(1, 65))
def test_every_budget_deletes_exactly_n_minus_budget_on_the_tiny_decoder(budget):
    pruner = built(llava15_info(**TINY), budget=budget)
    assert sum(pruner.schedule) == 64 - budget and pruner.schedule[3] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipe": [3]}, r"recipe must be a list of at least 2 ints >= 0 .* got \[3\]"),
        ({"recipe": [1, -1]}, r"recipe must be .* got \[1, -1\]"),
        ({"recipe": "1, 2"}, r"recipe must be .* got '1, 2'"),
        ({"recipe": [1, 2.0]}, r"recipe must be .* got \[1, 2.0\]"),
        ({"recipe": [1, 2], "preset": 60}, r"give recipe or preset, not both \(got preset=60\)"),
        ({"preset": 65}, r"preset 65 is not an official recipe; allowed: \[10, 20, 30, 40, 50, 55, 60, 70, 80, 90\]"),
        ({"budget": 0}, r"budget must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruners.build("fitprune", **kwargs)


def test_bad_setups_are_rejected():
    with pytest.raises(ValueError, match=r"recipe deletes 70 visual tokens per image, the model has 64; allowed"):
        built(llava15_info(**TINY), recipe=[60, 10, 0, 0])
    with pytest.raises(ValueError, match=r"cannot be scaled to budget 32; allowed: a recipe with at least one"):
        built(llava15_info(**TINY), budget=32, recipe=[0, 0])
    assert built(llava15_info(**TINY), budget=64, recipe=[0, 0]).llm_layers == ()
    with pytest.raises(ValueError, match=r"decoder has 1 layer\(s\); allowed: at least 2"):
        built(llava15_info(llm_layers=1))
    with pytest.raises(ValueError, match=r"budget 65 is out of range.*allowed 1..64"):
        built(llava15_info(**TINY), budget=65)


# ---------------------------------------------------------------- the offline search


def search_layer(alpha: float, full: tuple[float, float] = (1.55, 0.81)) -> list[int]:
    """Visual tokens a search step at `alpha` deletes from the constructed layer (first sample)."""
    pruner = fitprune_recipe.SearchPruner(alpha)
    pruner.setup(llava15_info(**TINY))
    pruner.full = (torch.full((1, 3), full[0]), torch.full((1, 3), full[1]))
    state, _ = llm_state(layer=1)
    out = pruner.llm_layer(state)
    assert pruner.visual[1].tolist() == [6] and pruner.deleted[1].tolist() == [6 - len(kept_visual(out))]
    return sorted(set(range(6)) - set(kept_visual(out)))


# Cross scores c/|T| = CROSS (sum 1.55), ascending j3 .05, j1 .10, j5 .20, j0 .30, j2 .40, j4 .50.
# Self scores s = .2 .1 .05 .3 .01 .15 (sum .81), ascending j4 .01, j2 .05, j1 .10, j5 .15, j0 .2, j3 .3.
@pytest.mark.parametrize(
    "alpha, deleted",
    [
        (0.1, []),  # cross >= 1.395: {j3, j1} (1.40 left); self >= .729: {j4, j2} (.75): no overlap
        (0.2, [1]),  # cross >= 1.24: {j3, j1}; self >= .648: {j4, j2, j1} (.65 left)
        (0.3, [1]),  # cross >= 1.085: {j3, j1, j5} (1.20); self >= .567: {j4, j2, j1}
        (0.5, [1, 5]),  # cross >= .775: {j3, j1, j5, j0} (.90); self >= .405: {j4, j2, j1, j5} (.50)
        (1.0, [0, 1, 2, 3, 4, 5]),  # bound 0: both prefixes take every token
    ],
)
def test_search_deletes_the_intersection_of_the_two_low_mass_prefixes(alpha, deleted):
    assert search_layer(alpha) == deleted


def test_search_deletes_nothing_where_the_pruned_model_is_already_below_the_bound():
    assert search_layer(0.5, full=(4.0, 0.81)) == []  # 1.55 left < 4.0 - 2.0 before any deletion


def test_search_records_the_full_models_masses():
    pruner = fitprune_recipe.SearchPruner()
    pruner.setup(llava15_info(**TINY))
    assert pruner.llm_layers == (0, 1, 2)
    state, _ = llm_state(layer=0, pad=1)
    assert pruner.llm_layer(state) is state
    cross, self_mass = pruner.masses[0]
    assert torch.allclose(cross, torch.tensor([1.55])) and torch.allclose(self_mass, torch.tensor([0.81]))
    assert pruner.other.tolist() == [5]  # 2 system + 3 text tokens


def test_flops_parts_add_up_to_the_layer_count():
    shape = DecoderShape(hidden=64, attn=64, kv=32, mlp=96)
    attn, post = fitprune_recipe.layer_parts(torch.tensor([7, 100]), shape)
    assert (attn + post).tolist() == [llama_layer_macs(7, shape), llama_layer_macs(100, shape)]


def test_stop_layer_and_recipe_on_a_constructed_table():
    # Width 1 everywhere: attention part 3n + 2n^2, o + MLP part 4n, whole layer 7n + 2n^2; 3 layers.
    shape = DecoderShape(hidden=1, attn=1, kv=1, mlp=1)
    visual = torch.tensor([[4, 2], [4, 3]])  # present at layers 0, 1
    deleted = torch.tensor([[2, 1], [1, 1]])
    cost = fitprune_recipe.predicted_cost(visual, deleted, torch.zeros(2, dtype=torch.long), shape)
    # Stop before layer s. Sample 0: s=0: 3 * layer(4) = 3 * 60 = 180;
    #   s=1: attn(4) 44 + post(2) 8 + 2 * layer(2) 22 = 96; s=2: 52 + attn(2) 14 + post(1) 4 + layer(1) 9 = 79.
    # Sample 1: s=1: 44 + post(3) 12 + 2 * layer(3) 39 = 134; s=2: 56 + attn(3) 27 + post(2) 8 + layer(2) 22 = 113.
    assert cost.tolist() == [[180, 96, 79], [180, 134, 113]]
    origin = torch.tensor([180.0, 180.0])
    assert fitprune_recipe.stop_layer(cost, origin, 0.3) == 1  # means 180, 115, 96 against 126
    assert fitprune_recipe.stop_layer(cost, origin, 0.4) == 2  # against 108
    assert fitprune_recipe.stop_layer(cost, origin, 0.5) is None  # against 90
    assert fitprune_recipe.recipe_until(deleted, 1) == [1, 0, 0]  # (2 + 1) // 2
    assert fitprune_recipe.recipe_until(deleted, 2) == [1, 1, 0]
    with_text = fitprune_recipe.predicted_cost(visual, deleted, torch.tensor([1, 1]), shape)
    assert with_text[0, 0] == 3 * (7 * 5 + 2 * 25)  # --flops-tokens all: n counts the other tokens too


def test_bisection_is_the_official_one_and_returns_the_smallest_reaching_alpha():
    tried = []

    def reaches(alpha: float) -> bool:
        tried.append(alpha)
        return alpha >= 0.37

    assert fitprune_recipe.bisect_alpha(reaches) == 0.375
    assert tried == [0.5, 0.25, 0.375, 0.3125, 0.34375, 0.359375, 0.3671875]  # stops at width 1/128
    assert fitprune_recipe.bisect_alpha(lambda a: True) == 0.0078125
    assert fitprune_recipe.bisect_alpha(lambda a: False) == 1.0


def test_recipe_script_on_a_tiny_model_folder(tmp_path, capsys):
    from data.tiny_llava import write_tiny_llava
    from lightning_modules.hf_model import load_model_and_processor

    folder = write_tiny_llava(tmp_path / "model", image_size=112)
    out = tmp_path / "configs" / "fitprune-tiny.yaml"
    args = ["--model", str(folder), "--num-samples", "2", "--rho", "0.5", "--device", "cpu", "--out", str(out)]
    recipe = fitprune_recipe.main(args)
    printed = capsys.readouterr().out
    assert f"recipe: {recipe}" in printed and "predicted FLOPs reduction" in printed
    text = out.read_text()
    assert text.startswith("# vtprune validate ")
    pruner_cfg = yaml.safe_load(text)["model"]["pruner"]
    assert pruner_cfg["class_path"] == "fitprune" and pruner_cfg["init_args"]["recipe"] == recipe
    assert len(recipe) == 4 and recipe[3] == 0 and 0 < sum(recipe) < 64
    reduction = float(printed.split("predicted FLOPs reduction ")[1].split()[0])
    assert reduction >= 0.5
    model, processor = load_model_and_processor(folder)
    batch = fitprune_recipe.make_batches(
        processor, fitprune_recipe.calibration_samples(None, 2, 0), 2, "{question}", model.dtype, "cpu"
    )[0]
    with torch.no_grad(), pruners.attach(model, pruners.build("fitprune", **pruner_cfg["init_args"])) as report:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert report.as_dict()["visual_tokens"] == 64 - sum(recipe)
    # Unreachable: even deleting every visual token inside layer 0 saves at most 1 - attn(64) / (4 layer(64)).
    with pytest.raises(SystemExit, match=r"rho 0.95 cannot be reached: .* allowed: rho <= 0.909"):
        fitprune_recipe.main(["--model", str(folder), "--num-samples", "2", "--rho", "0.95", "--device", "cpu"])


# ---------------------------------------------------------------- end to end on the tiny model


generate = functools.partial(generate_new_tokens, new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("kwargs", [{"budget": 32}, {}, {"recipe": [10, 0, 20, 0]}])
def test_batched_equals_one_by_one(tiny_llava, kwargs):
    inputs = make_inputs(tiny_llava, [3, 9], seed=1)
    batched = generate(tiny_llava, inputs, pruners.build("fitprune", **kwargs))
    for i in range(2):
        alone = generate(tiny_llava, slice_inputs(inputs, i), pruners.build("fitprune", **kwargs))
        assert torch.equal(batched[i], alone[0]), f"sample {i} differs when batched"


def test_budget_is_met_and_each_layer_deletes_its_count(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 9])
    pruner = pruners.build("fitprune", budget=32)
    _, stats = generate(tiny_llava, inputs, pruner, report=True)
    assert pruner.schedule == [2, 16, 14, 0]
    assert stats["visual_tokens"] == 32
    # Cuts inside layers 0, 1, 2 (after attention): layer l + 1 is the first to see the shorter sequence.
    assert stats["visual_tokens_per_layer"] == [64, 62, 46, 32]


def test_hooked_layer_cache_keeps_every_token_its_attention_saw(tiny_llava):
    inputs = slice_inputs(make_inputs(tiny_llava, [5]), 0)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), pruners.attach(tiny_llava, pruners.build("fitprune", recipe=[0, 10, 6, 0])):
        cache = tiny_llava(**inputs, use_cache=True).past_key_values
    assert [layer.keys.shape[2] for layer in cache.layers] == [length, length, length - 10, length - 16]


def test_keep_everything_budget_reproduces_unpruned_generation(tiny_llava):
    inputs = make_inputs(tiny_llava, [3, 8])
    assert torch.equal(generate(tiny_llava, inputs, pruners.build("fitprune", budget=64)), generate(tiny_llava, inputs))


def test_two_images_per_sample_keep_the_budget_each():
    model = make_llava(seed=2)
    inputs = make_inputs(model, [4, 6], images_per_sample=2)
    _, stats = generate(model, inputs, pruners.build("fitprune", budget=20), report=True)
    assert stats["visual_tokens"] == 40  # budget per image
