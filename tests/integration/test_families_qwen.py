"""Qwen2-VL and Qwen2.5-VL: the foundation's oracles on tiny configs built in code, for every pruner the
support matrix runs there; the rejection of every other; the README's matrix; M-RoPE positions kept through
pruning and decoding; the merged-token attention probe; VisionZip's CLS-free variant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_oracles import KEEP_ALL, NO_BUDGET, budget_met
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import pruners
from pruners.base import ModelInfo, Pruner, Stage, TokenState
from pruners.runtime import check_support, runnable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import support_matrix  # noqa: E402

IMAGE, VIDEO, PAD, VOCAB = 3, 4, 0, 64
GRID = (8, 12)  # patches of each test image: 4 x 6 = 24 merged tokens
VISUAL = 24
BUDGET = 8
NEW_TOKENS = 4
KINDS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
MATRIX = pruners.support_matrix()


def supported(kind: str) -> list[str]:
    return [name for name, row in MATRIX.items() if not row[KINDS[kind]].startswith("no")]


def rejected(kind: str) -> list[str]:
    return [name for name, row in MATRIX.items() if row[KINDS[kind]].startswith("no")]


def make_qwen(kind: str, seed: int = 0, attn: str = "sdpa", full_attention: tuple[int, ...] = (2,)):
    """A 4-layer Qwen2 decoder with a 2-block (Qwen2-VL) or 3-block (Qwen2.5-VL: 56 px windows = 2 x 2 merged
    tokens, `full_attention` blocks attend over the whole image) vision tower; random weights."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if kind == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO)
        cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=list(full_attention),
        )
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO)
        cls = Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init: well separated logits, stable greedy oracles
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.generation_config.pad_token_id = PAD
    return model


def make_inputs(prompt_lens: list[int], seed: int = 0, images: int = 1, grid: tuple[int, int] = GRID) -> dict:
    """Left-padded batch: each sample = text, its images (a text token between two), text of its own length."""
    g = torch.Generator().manual_seed(seed)
    merged = grid[0] * grid[1] // 4
    rows = []
    for plen in prompt_lens:
        row = torch.randint(5, VOCAB, (2,), generator=g).tolist()
        for i in range(images):
            row += [IMAGE] * merged + torch.randint(5, VOCAB, (1 if i < images - 1 else plen,), generator=g).tolist()
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    n_images = len(rows) * images
    pixels = torch.randn(n_images * grid[0] * grid[1], 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, *grid]] * n_images),
        "mm_token_type_ids": (ids == IMAGE).long(),
    }


def one(inputs: dict, i: int, images: int = 1) -> dict:
    """Sample i alone, padding removed."""
    keep = inputs["attention_mask"][i].bool()
    patches = inputs["pixel_values"].shape[0] // inputs["image_grid_thw"].shape[0]
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        "mm_token_type_ids": inputs["mm_token_type_ids"][i][keep][None],
        "pixel_values": inputs["pixel_values"][i * images * patches : (i + 1) * images * patches],
        "image_grid_thw": inputs["image_grid_thw"][i * images : (i + 1) * images],
    }


def build(name: str, budget: int | None = BUDGET, **kw) -> Pruner:
    if name in NO_BUDGET:  # adaptive: no budget to give (test_oracles.NO_BUDGET)
        return pruners.build(name, **kw)
    return pruners.build(name) if name == "none" else pruners.build(name, budget=budget, **kw)


def generate(model, inputs, pruner=None, report=False):
    """The NEW_TOKENS greedy tokens, with `pruner` attached if given (and its report as a dict)."""
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, **kw)[:, -NEW_TOKENS:]
        with pruners.attach(model, pruner) as rep:
            out = model.generate(**inputs, **kw)[:, -NEW_TOKENS:]
    return (out, rep.as_dict()) if report else out


MODELS = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the matrices are tiny, and on a busy 2-core machine a second thread
    makes each small matmul wait for a core (measured 0.3 ms vs 24 ms per call). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(kind: str):
    """One shared tiny model per family (tests that change a model build their own)."""
    if kind not in MODELS:
        MODELS[kind] = make_qwen(kind)
    return MODELS[kind]


@pytest.fixture(params=sorted(KINDS))
def qwen(request):
    return request.param, model_of(request.param)


def by_kind(names) -> list:
    return [pytest.param(kind, name, id=f"{kind}-{name}") for kind in sorted(KINDS) for name in names(kind)]


# -- the oracles ---------------------------------------------------------------------------------------


def test_none_forward_and_generation_match_hf(qwen):
    _, model = qwen
    inputs = make_inputs([3, 8])
    with torch.no_grad():
        ref = model(**inputs).logits
        with pruners.attach(model, pruners.build("none")):
            out = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ref - out)[real].abs().max() <= 1e-5
    assert torch.equal(generate(model, inputs, pruners.build("none")), generate(model, inputs))


@pytest.mark.parametrize("kind,name", by_kind(lambda kind: [n for n in supported(kind) if n in KEEP_ALL]))
def test_keep_everything_matches_hf(kind, name):
    model = model_of(kind)
    inputs = make_inputs([3, 8], images=2)
    full = build(name, budget=VISUAL, **KEEP_ALL[name])
    assert torch.equal(generate(model, inputs, full), generate(model, inputs))
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        with pruners.attach(model, full):
            out = model(**inputs).logits[:, -1]
    assert (ref - out).abs().max() <= 1e-5


@pytest.mark.parametrize("kind,name", by_kind(supported))
def test_batched_equals_one_by_one_and_budget_met(kind, name):
    model = model_of(kind)
    inputs = make_inputs([3, 9], seed=1)
    batched, stats = generate(model, inputs, build(name), report=True)
    for i in range(2):
        assert torch.equal(batched[i], generate(model, one(inputs, i), build(name))[0]), f"{name}: sample {i}"
    if name != "none" and name not in NO_BUDGET:
        assert budget_met(name, stats, BUDGET, visual=VISUAL), stats["visual_tokens_per_layer"]
    assert stats["num_samples"] == 2 and stats["prefill_flops"] > 0 and stats["kv_cache_bytes"] > 0


@pytest.mark.parametrize("kind,name", by_kind(supported))
def test_model_restored_after_attach(kind, name):
    model = make_qwen(kind, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs([4, 6], images=2)
    ref = generate(model, inputs)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    generate(model, inputs, build(name))
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(generate(model, inputs), ref)


def test_budget_beyond_an_image_is_rejected_at_its_prefill(qwen):
    _, model = qwen
    with pytest.raises(ValueError, match=rf"budget {VISUAL + 1} is out of range .* allowed 1\.\.{VISUAL}"):
        with torch.no_grad(), pruners.attach(model, pruners.build("fastv", budget=VISUAL + 1)):
            model(**make_inputs([2]))
    assert "forward" not in vars(model.model)


def test_images_of_another_size_set_the_pruner_up_again(qwen):
    """Budgets count merged tokens per image: 8 of 4 x 6 on one call, 8 of 2 x 4 on the next."""
    _, model = qwen
    pruner = pruners.build("pool", budget=8)
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        model(**make_inputs([2], grid=GRID))
        assert pruner.out_grid == (2, 4) and pruner.info.visual_tokens == VISUAL
        model(**make_inputs([2], grid=(4, 8)))
        assert pruner.out_grid == (2, 4) and pruner.info.visual_tokens == 8
    assert [round(r.llm_visual[0]) for r in report.samples] == [8, 8]


def test_images_of_different_sizes_in_one_batch_are_rejected(qwen):
    _, model = qwen
    a, b = make_inputs([2], grid=GRID), make_inputs([2], grid=(4, 8))
    ids = torch.nn.utils.rnn.pad_sequence([a["input_ids"][0], b["input_ids"][0]], batch_first=True, padding_side="left")
    mixed = {
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
    }
    with pytest.raises(ValueError, match=r"images of different sizes in one batch .* allowed: one image size"):
        with torch.no_grad(), pruners.attach(model, pruners.build("fastv", budget=4)):
            model(**mixed)


def test_text_only_batch_runs_unpruned(qwen):
    _, model = qwen
    ids = torch.randint(5, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with pruners.attach(model, pruners.build("fastv", budget=4)):
            out = model(input_ids=ids).logits
    assert (ref - out).abs().max() <= 1e-5


# -- the needs contract and the support matrix -------------------------------------------------------------


@pytest.mark.parametrize("kind,name", by_kind(rejected))
def test_pruners_the_matrix_excludes_are_rejected_at_attach(kind, name):
    model = model_of(kind)
    family = KINDS[kind]
    missing = MATRIX[name][family].removeprefix("no: ").split(", ")
    with pytest.raises(ValueError) as err:
        with pruners.attach(model, pruners.build(name)):
            pass
    message = str(err.value)
    assert f"{name!r} cannot run on {family}" in message
    assert all(signal in message for signal in missing)
    assert f"pruners that can run on {family}: {', '.join(supported(kind))}" in message
    assert "forward" not in vars(model.model)


def test_matrix_follows_declarations():
    """A pruner runs where its needs (declared + implied by its stages) are all provided; the CLS-free VisionZip
    runs where only its fallback needs are; runnable() lists exactly the pruners the matrix accepts."""
    for kind, family in KINDS.items():
        assert runnable(family) == supported(kind)
    assert MATRIX["visionzip"][KINDS["qwen2_vl"]] == "CLS-free variant"
    assert MATRIX["visionzip"]["LlavaForConditionalGeneration"] == "yes"
    assert MATRIX["tome"][KINDS["qwen2_vl"]] == "no: vision_layers"  # no hooks inside Qwen's encoder
    assert MATRIX["prumerge"][KINDS["qwen2_5_vl"]].startswith("no: cls")  # ranks by CLS attention: never faked
    assert all(row["LlavaForConditionalGeneration"] == "yes" for row in MATRIX.values())


def test_check_support_names_signal_family_and_alternatives():
    with pytest.raises(
        ValueError,
        match=r"'tome' cannot run on Qwen2VLForConditionalGeneration: it needs "
        r"vision_layers \(VISION_LAYER hooks.*pruners that can run on .*fastv",
    ):
        check_support(pruners.build("tome"), "Qwen2VLForConditionalGeneration")


def test_readme_matrix_is_the_scripts_output():
    readme = (ROOT / "README.md").read_text()
    assert support_matrix.section(readme) == support_matrix.markdown()


# -- M-RoPE positions ---------------------------------------------------------------------------------------


def hf_positions(model, inputs) -> torch.Tensor:
    """(3, B, L) M-RoPE ids as the model computes them."""
    ids = inputs["input_ids"]
    pos, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return pos


def test_kept_tokens_keep_their_3d_positions_through_prefill_and_decode(qwen):
    """A pruned run equals the model's own text model fed only the kept tokens at their own (t, h, w) ids, and
    decoding continues at the model's next ids: the kept sequence is re-run with the generated tokens appended."""
    _, model = qwen
    inputs = make_inputs([5], seed=2)
    pruner = pruners.build("random", budget=BUDGET, seed=1)
    tokens = generate(model, inputs, pruner)[0]
    keep = torch.zeros(VISUAL, dtype=torch.bool)
    keep[pruner.slot_scores(VISUAL).topk(BUDGET).indices] = True  # random's own draw, the same for every image
    core = model.model
    with torch.no_grad():
        image = torch.cat(core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        ids = inputs["input_ids"][0]
        slots = (ids == IMAGE).nonzero()[:, 0]
        embeds = core.get_input_embeddings()(ids).clone()
        embeds[slots] = image
        kept = torch.ones_like(ids, dtype=torch.bool)
        kept[slots[~keep]] = False
        pos = hf_positions(model, inputs)[:, 0]
        step = pos[:, -1:] + torch.arange(1, NEW_TOKENS)  # text after the prompt: last id + 1, + 2, ...
        seq = torch.cat([embeds[kept], core.get_input_embeddings()(tokens[:-1])])
        rope = torch.cat([pos[:, kept], step], 1)[:, None]
        hidden = core.language_model(inputs_embeds=seq[None], position_ids=rope).last_hidden_state
        greedy = model.lm_head(hidden[0, -NEW_TOKENS:]).argmax(-1)
    assert torch.equal(greedy, tokens)


# -- the merged-token attention probe ---------------------------------------------------------------------


class Spy(Pruner):
    """Records what the runtime offers at VISION_OUTPUT (not registered)."""

    name = "spy"
    stages = frozenset({Stage.VISION_OUTPUT})
    needs = frozenset({"vision_attention"})

    def vision_output(self, state: TokenState) -> TokenState:
        probe = state.extras["vision_attention"]
        rows = torch.arange(state.num_tokens).expand(state.batch_size, -1)
        self.seen = {
            "attn": probe(rows, heads="none"),
            "logits": probe(rows, heads="none", logits=True),
            "keys": probe.keys(),
            "grid": state.grid,
            "hidden": state.hidden,
        }
        return state


def reference_attention(model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head probabilities and logits of the last vision block over each image's patches, rebuilt by hand
    from its input (norm1, qkv, rotary, softmax within the block's own segments), in the block's order; and
    that block's output."""
    block = model.model.visual.blocks[-1]
    seen = {}
    pre = block.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], **kw), with_kwargs=True)
    post = block.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    pre.remove()
    post.remove()
    attn = block.attn
    n = seen["x"].shape[0]
    q, k, _ = attn.qkv(block.norm1(seen["x"])).reshape(n, 3, attn.num_heads, -1).unbind(1)
    cos, sin = (t[:, None, :] for t in seen["position_embeddings"])
    half = q.shape[-1] // 2
    rot = lambda x: x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin  # noqa: E731
    q, k = rot(q).transpose(0, 1), rot(k).transpose(0, 1)  # (H, n, hd)
    logits = q @ k.transpose(1, 2) * attn.scaling
    cu = seen["cu_seqlens"].tolist()
    segment = torch.zeros(n, dtype=torch.long)
    for s, (a, b) in enumerate(zip(cu, cu[1:])):
        segment[a:b] = s
    same = segment[:, None] == segment[None, :]
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)
    return probs, logits, seen["out"]


@pytest.mark.parametrize("full_attention", [(2,), (0,)], ids=["last-block-full", "last-block-windowed"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merged_probe_pools_the_blocks_own_attention(kind, full_attention):
    if kind == "qwen2_vl" and full_attention == (0,):
        pytest.skip("Qwen2-VL has no windowed blocks")
    model = make_qwen(kind, full_attention=full_attention)
    inputs = make_inputs([2, 3], images=1)
    spy = Spy()
    with torch.no_grad(), pruners.attach(model, spy):
        model(**inputs)
    probs, logits, out = reference_attention(model, inputs)
    # The order the probe uses is checked independently: the merger applied to the block's output, taken in
    # that order four patches at a time, gives the model's merged tokens.
    from pruners.runtime.qwen2_vl import QwenVLRuntime

    runtime = QwenVLRuntime(model, pruners.build("none"))
    runtime_order = runtime._raster_order(inputs["image_grid_thw"], out.shape[0], out.device)
    merger = model.model.visual.merger
    with torch.no_grad():
        merged = merger(out[runtime_order])
    assert torch.allclose(merged.view(2, VISUAL, -1), spy.seen["hidden"], atol=1e-5)
    patches = out.shape[0] // 2
    for image in range(2):
        order = runtime_order[image * patches : (image + 1) * patches]
        p = probs[:, order][:, :, order].view(4, VISUAL, 4, VISUAL, 4)
        want = p.mean(2).sum(-1)  # mean over the query group's patches, sum over the key group's
        assert torch.allclose(spy.seen["attn"][image], want, atol=1e-5)
        lg = logits[:, order][:, :, order].view(4, VISUAL, 4, VISUAL, 4)
        assert torch.allclose(spy.seen["logits"][image], lg.mean(2).mean(-1), atol=1e-4)
    assert torch.allclose(spy.seen["attn"].sum(-1), torch.ones(2, 4, VISUAL), atol=1e-5)  # rows stay distributions
    if full_attention == (0,):  # a windowed last block: no probability leaves a 2 x 2 window of merged tokens
        cols = 6
        window = (torch.arange(VISUAL) // cols // 2) * (cols // 2) + (torch.arange(VISUAL) % cols) // 2
        outside = window[:, None] != window[None, :]
        assert spy.seen["attn"][:, :, outside].abs().max() == 0
    assert spy.seen["grid"] == (4, 6) and spy.seen["keys"].shape == (2, 4, VISUAL, 8)


# -- VisionZip's CLS-free variant ---------------------------------------------------------------------------


class MatrixProbe:
    """A constructed attention matrix (B, N, N) and keys (B, H, N, hd), answered as the runtime's probe is."""

    def __init__(self, attn: torch.Tensor, keys: torch.Tensor) -> None:
        self.attn, self._keys = attn, keys

    def __call__(self, query_index, heads="mean", logits=False):
        return torch.gather(self.attn, 1, query_index[..., None].expand(-1, -1, self.attn.shape[-1]))

    def keys(self) -> torch.Tensor:
        return self._keys


def qwen_info(**changes) -> ModelInfo:
    provides = frozenset({"vision_attention", "grid", "single_view", "llm_layers", "decode"})
    fields = dict(
        family="qwen2_vl",
        visual_tokens=8,
        grid=(2, 4),
        vision_layers=2,
        vision_feature_layer=2,
        llm_layers=4,
        has_cls=False,
        provides=provides,
    )
    return ModelInfo(**{**fields, **changes})


def test_visionzip_cls_free_keeps_most_received_and_merges_the_rest():
    """Dominant = the top received attention (column mean over every query); contextual targets = every
    step-th remaining token; each absorbs the mean of the tokens whose keys are closest (target + mean)."""
    received = torch.tensor([0.05, 0.3, 0.02, 0.2, 0.08, 0.1, 0.15, 0.1])
    attn = received.expand(1, 8, 8).clone()
    keys = torch.tensor([[1, 0], [0, 0], [1, 0.1], [0, 0], [0, 1], [0.1, 1], [0, 0], [0.2, 1]])[None, None]
    hidden = torch.randn(1, 8, 6)
    slots = torch.arange(8)[None]
    ones = torch.ones(1, 8, dtype=torch.bool)
    state = TokenState(
        hidden=hidden,
        valid=ones,
        visual=ones,
        positions=slots,
        origin=slots,
        sizes=torch.ones(1, 8),
        stage=Stage.VISION_OUTPUT,
        grid=(2, 4),
        extras={"vision_attention": MatrixProbe(attn, keys)},
    )
    pruner = pruners.build("visionzip", budget=5, contextual=2)
    pruner.setup(qwen_info())
    assert pruner.stages == frozenset({Stage.VISION_OUTPUT}) and pruner.order == "raster" and pruner.dominant == 3
    out = pruner.vision_output(state)
    # dominant {1, 3, 6}; remaining {0, 2, 4, 5, 7}: step 5 // 2 = 2, targets {0, 4}; 2 -> 0, 5 and 7 -> 4
    assert out.positions.tolist() == [[0, 1, 3, 4, 6]] and out.origin.tolist() == [[0, 1, 3, 4, 6]]
    h = hidden[0]
    want = torch.stack([h[0] + h[2], h[1], h[3], h[4] + (h[5] + h[7]) / 2, h[6]])
    assert torch.allclose(out.hidden[0], want, atol=1e-6)
    assert out.sizes.tolist() == [[2, 1, 1, 3, 1]]


def test_visionzip_variant_follows_the_family():
    pruner = pruners.build("visionzip", budget=8)
    pruner.setup(qwen_info(visual_tokens=24, grid=(4, 6)))
    assert pruner.cls_free and pruner.vision_layers == () and (pruner.dominant, pruner.contextual) == (7, 1)
    pruner.setup(
        ModelInfo(
            family="llava",
            visual_tokens=64,
            grid=(8, 8),
            vision_layers=3,
            vision_feature_layer=2,
            llm_layers=4,
            has_cls=True,
        )
    )
    assert not pruner.cls_free and pruner.stages == frozenset({Stage.VISION_LAYER}) and pruner.order == "official"
    for kwargs, match in [
        ({"order": "official"}, "order='official' on an encoder without CLS"),
        ({"keep_cls": True}, "keep_cls=True"),
    ]:
        with pytest.raises(ValueError, match=match):
            pruners.build("visionzip", budget=8, **kwargs).setup(qwen_info(visual_tokens=24, grid=(4, 6)))


# -- the efficiency report ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_report_flops_match_a_direct_count(kind):
    """Vision FLOPs (every block, Qwen2.5-VL's windowed ones per window, + the merger, not the patch embedding)
    and LLM prefill FLOPs equal the matmuls torch counts on eager attention, for a sample with two images."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() // 2

    model = make_qwen(kind, attn="eager")
    inputs = make_inputs([3], images=2)
    visual, lm = model.model.visual, model.model.language_model
    with torch.no_grad():
        with pruners.attach(model, pruners.build("none")) as report:
            model(**inputs)
        vision = counted(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
        vision -= counted(lambda: visual.patch_embed(inputs["pixel_values"]))
        embeds = torch.randn(1, inputs["input_ids"].shape[1], lm.config.hidden_size)
        llm = counted(lambda: lm(inputs_embeds=embeds))
    stats = report.as_dict()
    assert stats["vision_flops"] == vision
    assert stats["prefill_flops"] == llm


# -- FiCoCo-V's CLS-free variant (no family has encoder hooks without CLS yet: a constructed state) ------------


def test_ficoco_v_cls_free_ranks_by_the_mean_key():
    """Without CLS the task term is a_i = head mean of kbar . k_i (kbar: the mean patch key); with lam = 1 and no
    local penalty the r patches merged away are exactly the r lowest a_i."""
    from types import SimpleNamespace

    from pruners.base import ALL_SIGNALS
    from pruners.runtime.vision import VisionProbe

    torch.manual_seed(0)
    n, heads, hd = 16, 2, 4
    query, key = torch.randn(1, n, heads * hd), torch.randn(1, n, heads * hd)
    layer = SimpleNamespace(self_attn=SimpleNamespace(head_dim=hd, scale=hd**-0.5))
    valid = torch.ones(1, n, dtype=torch.bool)
    probe = VisionProbe(layer, query, key, valid)
    slots = torch.arange(n)[None]
    state = TokenState(
        hidden=torch.randn(1, n, 8),
        valid=valid,
        visual=valid,
        positions=slots,
        origin=slots,
        sizes=torch.ones(1, n),
        stage=Stage.VISION_LAYER,
        layer=1,
        grid=(4, 4),
        probe=probe,
        extras={"keys": probe.key},
    )
    info = ModelInfo(
        family="no-cls",
        visual_tokens=n,
        grid=(4, 4),
        vision_layers=3,
        vision_feature_layer=2,
        llm_layers=4,
        has_cls=False,
        provides=ALL_SIGNALS - {"cls"},
    )
    pruner = pruners.build("ficoco-v", budget=n - 2, lam=1.0, penalty_scale=1.0)
    pruner.setup(info)
    assert pruner.cls_free and pruner.vision_schedule == {1: 2}
    out = pruner.vision_layer(state)
    keys = probe.key[0]  # (H, N, hd)
    task = torch.einsum("hd,hnd->hn", keys.mean(1), keys).mean(0)
    dropped = set(task.argsort()[:2].tolist())
    assert set(out.origin[0].tolist()) == set(range(n)) - dropped
    with pytest.raises(ValueError, match="cls_order='official' .* no CLS token; allowed: cls_order='paper'"):
        pruners.build("ficoco-v", budget=n - 2, cls_order="official").setup(info)
    assert MATRIX["ficoco-v"][KINDS["qwen2_vl"]] == "no: cls, vision_layers"  # Qwen has no encoder hooks at all


def test_manual_decoding_without_position_ids_matches_hf(qwen):
    """A hand-written greedy loop that passes no position ids: the model's own rule (past length + rope_deltas)."""
    _, model = qwen
    inputs = make_inputs([4])
    del inputs["attention_mask"]

    def loop() -> list[int]:
        out = model(**inputs, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(3):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens

    with torch.no_grad():
        ref = loop()
        with pruners.attach(model, pruners.build("none")):
            assert loop() == ref
