"""LLaVA-NeXT (any-resolution): HF's packing reproduced, the budget split over views, the foundation's oracles
on a tiny config built in code for every pruner the support matrix runs there, the rejection of every other,
the per-image efficiency report, and G-Prune's separate graphs."""

from __future__ import annotations

import pytest
import torch
from test_oracles import KEEP_ALL, NO_BUDGET
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

import pruners
from pruners import flops
from pruners.base import Stage, TokenState
from pruners.methods.gprune import graph_scores
from pruners.runtime import runnable
from pruners.runtime.llava_next import image_layout, view_quotas

FAMILY = "LlavaNextForConditionalGeneration"
IMAGE, PAD, VOCAB = 3, 0, 64
TILE, SIDE = 56, 4  # CLIP at 56 px / patch 14: every view is a 4 x 4 grid
PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # 1 x 2, 2 x 1 or 2 x 2 crops
MAX_VISUAL = 16 * 5  # base + 4 crops: ModelInfo.visual_tokens
# (height, width) -> views, visual tokens (newlines excluded), newlines. (112, 80): 2 x 2 crops, unpadding keeps 6
# of the grid's 8 columns; (56, 112): 1 x 2 crops, nothing unpadded; (40, 112): 1 x 2, 2 of 4 rows kept.
MIXED = [(112, 80), (56, 112)]
FULL = [(112, 112), (96, 96)]  # both 2 x 2 with nothing unpadded: MAX_VISUAL visual tokens each
BUDGET = 24
NEW_TOKENS = 4
SUPPORTED = runnable(FAMILY)


def make_llava_next(seed: int = 0, vision_layers: int = 3, llm_layers: int = 4) -> LlavaNextForConditionalGeneration:
    """A tiny CLIP + LLaMA LLaVA-NeXT with random weights (the widths of conftest's tiny LLaVA)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=PAD,
    )
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init: well separated logits, stable greedy oracles
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.generation_config.pad_token_id = PAD
    return model


def make_inputs(sizes: list[tuple[int, int]], prompt_lens: list[int], seed: int = 0) -> dict:
    """Left-padded batch, one image per sample: text, the image's tokens (HF's count), text of its own length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for size, plen in zip(sizes, prompt_lens):
        n = image_layout(torch.tensor(size), PINPOINTS, TILE, SIDE).length
        rows.append(
            torch.randint(4, VOCAB, (2,), generator=g).tolist()
            + [IMAGE] * n
            + torch.randint(4, VOCAB, (plen,), generator=g).tolist()
        )
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    pixels = torch.randn(len(rows), 5, 3, TILE, TILE, generator=g)  # padded to the most views, as the processor
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def alone(inputs: dict, i: int) -> dict:
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        "pixel_values": inputs["pixel_values"][i : i + 1],
        "image_sizes": inputs["image_sizes"][i : i + 1],
    }


def build(name: str, budget: int | None = BUDGET, **kw) -> pruners.Pruner:
    if name in NO_BUDGET:  # adaptive: no budget to give (test_oracles.NO_BUDGET)
        return pruners.build(name, **kw)
    return pruners.build(name) if name == "none" else pruners.build(name, budget=budget, **kw)


def generate(model, inputs, pruner=None, report: bool = False):
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, **kw)[:, -NEW_TOKENS:]
        with pruners.attach(model, pruner) as rep:
            out = model.generate(**inputs, **kw)[:, -NEW_TOKENS:]
    return (out, rep.as_dict()) if report else out


@pytest.fixture(scope="module")
def tiny_next():
    return make_llava_next()


@pytest.fixture(scope="module")
def mixed():
    return make_inputs(MIXED, [3, 7], seed=1)


# -- HF's packing and the budget split -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(112, 80), (56, 112), (40, 112), (112, 112)])
def test_layout_is_hf_packing(tiny_next, size):
    """Each view patch's offset and each newline's, read off HF's own `pack_image_features` on labelled features."""
    layout = image_layout(torch.tensor(size), PINPOINTS, TILE, SIDE)
    views = len(layout.table)
    label = torch.arange(views * 16, dtype=torch.float).view(views, 16, 1)  # value = view * 16 + patch
    with torch.no_grad():
        packed, lens = tiny_next.model.pack_image_features(
            [label], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0])
        )
    packed = packed[0][:, 0]
    assert int(lens[0]) == layout.length == len(packed)
    where = {int(v): i for i, v in enumerate(packed.tolist()) if v >= 0}
    expected = torch.tensor([[where.get(v * 16 + p, -1) for p in range(16)] for v in range(views)])
    assert torch.equal(layout.table, expected)
    assert torch.equal(layout.newlines, (packed == -1).nonzero()[:, 0])


def test_view_quotas_split_the_budget_by_largest_remainder():
    counts = torch.tensor([16, 12, 12, 12, 12])  # (112, 80): base and four unpadded crops
    assert view_quotas(24, counts).tolist() == [6, 5, 5, 4, 4]  # 6 exact; 4.5 each: the first two crops round up
    assert view_quotas(640, torch.tensor([576] * 5)).tolist() == [128] * 5  # VisionZip's LLaVA-NeXT 640
    assert view_quotas(100, counts).tolist() == counts.tolist()  # more than the image has: all of it
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        counts = torch.randint(0, 30, (5,), generator=g)
        budget = int(torch.randint(1, 120, (1,), generator=g))
        share = view_quotas(budget, counts)
        assert int(share.sum()) == min(budget, int(counts.sum())) and (share <= counts).all()


# -- the oracles -------------------------------------------------------------------------------------------------
def test_none_forward_and_generation_match_hf(tiny_next):
    inputs = make_inputs([(112, 80), (56, 112), (40, 112)], [3, 6, 4])
    with torch.no_grad():
        ref = tiny_next(**inputs).logits
        with pruners.attach(tiny_next, pruners.build("none")):
            out = tiny_next(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ref - out)[real].abs().max() <= 1e-5
    assert torch.equal(generate(tiny_next, inputs, pruners.build("none")), generate(tiny_next, inputs))


@pytest.mark.parametrize("name", sorted(set(KEEP_ALL) & set(SUPPORTED)))
def test_keep_everything_matches_hf(tiny_next, mixed, name):
    """Budget = the most visual tokens an image can have: every token of these images stays."""
    full = build(name, budget=MAX_VISUAL, **KEEP_ALL[name])
    assert torch.equal(generate(tiny_next, mixed, full), generate(tiny_next, mixed))
    with torch.no_grad():
        ref = tiny_next(**mixed).logits[:, -1]
        with pruners.attach(tiny_next, full):
            out = tiny_next(**mixed).logits[:, -1]
    assert (ref - out).abs().max() <= 1e-5


@pytest.mark.parametrize("name", SUPPORTED)
def test_batched_equals_one_by_one_and_model_restored(tiny_next, mixed, name):
    """Images with 5 and 3 views in one batch; afterwards no attribute, hook or weight of the model has changed."""
    before = {k: v.clone() for k, v in tiny_next.state_dict().items()}
    hooks = {n: dict(m._forward_hooks) for n, m in tiny_next.named_modules()}
    batched = generate(tiny_next, mixed, build(name))
    for i in range(2):
        assert torch.equal(batched[i], generate(tiny_next, alone(mixed, i), build(name))[0]), f"{name}: sample {i}"
    assert "forward" not in vars(tiny_next.model) and "get_image_features" not in vars(tiny_next.model)
    assert {n: dict(m._forward_hooks) for n, m in tiny_next.named_modules()} == hooks
    assert all(torch.equal(before[k], v) for k, v in tiny_next.state_dict().items())


@pytest.mark.parametrize("name", [n for n in SUPPORTED if n != "none" and n not in NO_BUDGET])
@pytest.mark.parametrize("sizes", [MIXED, FULL], ids=["mixed", "full"])
def test_budget_is_met_for_the_whole_image(tiny_next, name, sizes):
    """`budget` visual tokens of each whole image (base + crops, newlines excluded) reach the last LLM layer;
    VTW (its budget picks the withdrawal layer) holds every visual token up to that layer and none after."""
    inputs = make_inputs(sizes, [3, 7], seed=2)
    with torch.no_grad(), pruners.attach(tiny_next, build(name)) as report:
        tiny_next(**inputs)
    stats = report.as_dict()
    if name == "vtw":
        visual = [int(image_layout(torch.tensor(s), PINPOINTS, TILE, SIDE).table.ge(0).sum()) for s in sizes]
        per_layer = stats["visual_tokens_per_layer"]
        assert per_layer[-1] == 0 and per_layer[0] == sum(visual) / 2 and set(per_layer) == {per_layer[0], 0}
    else:
        assert stats["visual_tokens"] == BUDGET, stats["visual_tokens"]


@pytest.mark.parametrize("name", sorted(set(pruners.available()) - set(SUPPORTED)))
def test_unsupported_pruners_are_rejected_naming_the_signal(tiny_next, name):
    missing = pruners.support_matrix()[name][FAMILY]
    assert missing.startswith("no: ")
    with pytest.raises(ValueError, match=f"cannot run on {FAMILY}: it needs {missing[4:].split(',')[0]}") as err:
        with pruners.attach(tiny_next, build(name)):
            pass
    assert "gprune" in str(err.value) and "visionzip" in str(err.value)  # the pruners that can run
    assert "forward" not in vars(tiny_next.model)


# -- views, newlines, report -------------------------------------------------------------------------------------
class Spy(pruners.Pruner):
    """Test pruner: records what the vision stages see and keeps everything."""

    name = "test-spy"
    stages = frozenset({Stage.VISION_LAYER, Stage.VISION_OUTPUT})

    def __init__(self, budget=None):
        super().__init__(budget)
        self.seen = {}

    def setup(self, info):
        super().setup(info)
        self.vision_layers = (0,)

    def vision_layer(self, state):
        self.seen["layer"] = state
        return state

    def vision_output(self, state):
        self.seen["output"] = state
        return state


def test_views_are_rows_with_view_image_and_quota(tiny_next, mixed):
    spy = Spy(budget=BUDGET)
    with torch.no_grad(), pruners.attach(tiny_next, spy):
        tiny_next(**mixed)
    for stage in ("layer", "output"):
        state = spy.seen[stage]
        assert state.grid == (SIDE, SIDE)
        assert state.view.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
        assert state.image.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
        assert state.quota.tolist() == [6, 5, 5, 4, 4, 8, 8, 8]
        # (112, 80): unpadding keeps grid columns 1..6 of 0..7, so each crop loses its outer column.
        visual = state.visual & state.valid
        assert visual.sum(-1).tolist() == [16, 12, 12, 12, 12, 16, 16, 16]
    first_crop = spy.seen["layer"]  # slot 0: CLS; slot 1 + p: patch p; crop 1 is the grid's top-left crop
    assert not first_crop.visual[1, 1 + torch.arange(0, 16, 4)].any() and first_crop.visual[1, 1 + 1 : 1 + 4].all()


def test_newlines_are_kept_and_not_counted(tiny_next, mixed):
    """Pruning drops visual tokens only: every newline stays, and the LLM input holds text + budget + newlines."""
    with torch.no_grad(), pruners.attach(tiny_next, build("random")) as report:
        tiny_next(**mixed)
    stats = report.as_dict()
    newlines = [len(image_layout(torch.tensor(s), PINPOINTS, TILE, SIDE).newlines) for s in MIXED]
    text = (mixed["attention_mask"].bool() & (mixed["input_ids"] != IMAGE)).sum(-1)
    assert stats["visual_tokens_llm_input"] == BUDGET
    rec = report.samples
    assert [r.llm_tokens[0] for r in rec] == (text + BUDGET + torch.tensor(newlines)).tolist()


def test_report_counts_each_view_in_the_vision_tower(tiny_next, mixed):
    """Vision FLOPs: every view's CLIP pass (17 tokens, attending within the view) and projector; tokens per
    layer are summed over the image's views; the KV cache holds the tokens kept."""
    with torch.no_grad(), pruners.attach(tiny_next, build("gprune")) as report:
        out = tiny_next(**mixed, use_cache=True)
    stats = report.as_dict()
    views = [5, 3]
    vcfg = tiny_next.config.vision_config
    layers = tiny_next.config.vision_feature_layer % (vcfg.num_hidden_layers + 1)  # CLIP layers run
    proj = tiny_next.model.multi_modal_projector.linear_1
    expected = [
        v
        * (
            layers * flops.vit_layer_macs(17, 32, 64, pairs=17 * 17)  # not (17 v)^2: views apart
            + 16 * (proj.in_features * proj.out_features + proj.out_features**2)
        )
        for v in views
    ]
    assert stats["vision_flops"] == sum(expected) / 2
    assert stats["vision_tokens_per_layer"] == [17 * sum(views) / 2] * layers
    kept = [r.llm_tokens[0] for r in report.samples]
    keys = out.past_key_values.layers[0].keys
    assert stats["kv_cache_bytes"] == sum(2 * k * keys.shape[1] * keys.shape[3] * 4 * 4 for k in kept) / 2


# -- G-Prune's graphs --------------------------------------------------------------------------------------------
def views_state(hidden: torch.Tensor, view: list[int], image: list[int], quota: list[int]) -> TokenState:
    rows, n, _ = hidden.shape
    slots = torch.arange(n).expand(rows, n)
    return TokenState(
        hidden=hidden,
        valid=torch.ones(rows, n, dtype=torch.bool),
        visual=torch.ones(rows, n, dtype=torch.bool),
        positions=slots,
        origin=slots + 1,
        sizes=torch.ones(rows, n),
        stage=Stage.VISION_OUTPUT,
        grid=(2, 3),
        view=torch.tensor(view),
        image=torch.tensor(image),
        quota=torch.tensor(quota),
    )


@pytest.mark.parametrize("graphs", ["official", "view"])
def test_gprune_builds_no_edge_across_its_graphs(graphs):
    """Two images of a base + 2 crops. Each graph's choice equals G-Prune on that token set alone (official: the
    base; the crops joined), so no edge links the base to a crop or one image to another; with "view" no edge
    links two crops either: changing one crop leaves the other's choice unchanged."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 6, 8, generator=g)
    hidden[1, :3] = hidden[2, :3] = hidden[0, :3]  # near-duplicates across views: an edge if views shared a graph
    quota = [2, 2, 1, 3, 1, 2]
    pruner = pruners.build("gprune", budget=5, graphs=graphs)
    out = pruner.vision_output(views_state(hidden, [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1], quota))
    kept = [set(out.origin[r][out.valid[r]].tolist()) for r in range(6)]
    groups = [[0], [1, 2], [3], [4, 5]] if graphs == "official" else [[r] for r in range(6)]
    for rows in groups:
        tokens = hidden[rows].reshape(1, -1, 8)
        scores = graph_scores(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))[0]
        best = set(scores.argsort(descending=True, stable=True)[: sum(quota[r] for r in rows)].tolist())
        assert best == {6 * i + o - 1 for i, r in enumerate(rows) for o in kept[r]}
    changed = hidden.clone()
    changed[2] = torch.randn(6, 8, generator=g)
    again = pruner.vision_output(views_state(changed, [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1], quota))
    same_rows = [0, 3, 4, 5] + ([1] if graphs == "view" else [])
    for r in same_rows:
        assert set(again.origin[r][again.valid[r]].tolist()) == kept[r]
