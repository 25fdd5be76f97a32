"""The analytic FLOPs agree with a direct count of the matmuls torch runs in a tiny model."""

from __future__ import annotations

import torch
from conftest import make_inputs, make_llava
from torch.utils.flop_counter import FlopCounterMode

import pruners
from pruners.flops import DecoderShape, fastv_layer_macs, llama_layer_macs, vit_layer_macs


def counted_macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


def test_llama_layer_count_matches_matmuls():
    model = make_llava(llm_layers=1, attn="eager")  # eager: attention as plain matmuls the counter sees
    lm = model.model.language_model
    n = 37
    hidden = torch.randn(1, n, lm.config.hidden_size)
    pos = torch.arange(n)[None]
    cos_sin = lm.rotary_emb(hidden, position_ids=pos)
    with torch.no_grad():
        got = counted_macs(lambda: lm.layers[0](hidden, attention_mask=None, position_embeddings=cos_sin,
                                                 position_ids=pos))
    assert got == llama_layer_macs(n, DecoderShape.from_config(lm.config))


def test_vit_layer_count_matches_matmuls():
    model = make_llava(attn="eager")
    tower = model.model.vision_tower
    cfg = tower.config
    hidden = torch.randn(1, 65, cfg.hidden_size)
    with torch.no_grad():
        got = counted_macs(lambda: tower.encoder.layers[0](hidden, attention_mask=None))
    assert got == vit_layer_macs(65, cfg.hidden_size, cfg.intermediate_size)


def test_fastv_convention_on_paper_numbers():
    # LLaVA-1.5-7B, 32 layers, n = 35 + 576 + 50 tokens, d = 4096, m = 11008: FastV's count.
    n, s = 661, DecoderShape(4096, 4096, 4096, 11008)
    assert fastv_layer_macs(n, s) == 4 * n * 4096**2 + 2 * n * n * 4096 + 2 * n * 4096 * 11008
    assert llama_layer_macs(n, s) - fastv_layer_macs(n, s) == n * 4096 * 11008


def test_report_flops_sum_layers_of_actual_tokens(tiny_llava):
    inputs = make_inputs(tiny_llava, [5])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), pruners.attach(tiny_llava, pruners.build("fastv", budget=16, k=2)) as report:
        tiny_llava(**inputs)
    shape = DecoderShape.from_config(tiny_llava.config.text_config)
    cut = length - (64 - 16)
    want = 2 * llama_layer_macs(length, shape) + 2 * llama_layer_macs(cut, shape)
    stats = report.as_dict()
    assert stats["prefill_flops"] == want
    assert stats["visual_tokens_per_layer"] == [64, 64, 16, 16]
    assert stats["visual_tokens_layer_mean"] == 40
    assert stats["visual_tokens_llm_input"] == 64


class CutBetweenAttentionAndMLP(pruners.Pruner):
    """Test pruner: drops the last 32 visual tokens between attention and MLP of LLM layer 1 and of
    vision layer 0 (as FiCoCo-L, FitPrune, ToMe and FiCoCo-V cut)."""

    name = "test-mid-cut"
    stages = frozenset({pruners.Stage.LLM_LAYER, pruners.Stage.VISION_LAYER})
    llm_hook_point = "attn"

    def __init__(self):
        super().__init__()
        self.llm_layers, self.vision_layers, self.vision_hook_point = (1,), (0,), "attn"

    def _drop_last_32(self, state):
        visual = state.visual & state.valid
        rank = visual.long().cumsum(-1)
        keep = state.valid & ~(visual & (rank > rank[:, -1:] - 32))
        return state.keep(pruners.ops.compact_index(keep))

    def llm_layer(self, state):
        return self._drop_last_32(state)

    def vision_layer(self, state):
        return self._drop_last_32(state)


def test_a_cut_between_attention_and_mlp_counts_the_mlp_on_the_kept_tokens(tiny_llava):
    inputs = make_inputs(tiny_llava, [5])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), pruners.attach(tiny_llava, CutBetweenAttentionAndMLP()) as report:
        tiny_llava(**inputs)
    stats = report.as_dict()
    # Vision layer 0 cut 65 -> 33 inside it; layer 1 then runs on 33 (the feature layer is 2).
    cfg = tiny_llava.config.vision_config
    vision = vit_layer_macs(65, cfg.hidden_size, cfg.intermediate_size, n_mlp=33)
    vision += vit_layer_macs(33, cfg.hidden_size, cfg.intermediate_size)
    width = tiny_llava.config.text_config.hidden_size
    assert stats["vision_flops"] == vision + 32 * (cfg.hidden_size * width + width * width)  # + the projector
    # The LLM sees 32 image tokens; layer 1's attention sees n - 32, its MLP and layers 2-3 n - 64.
    shape = DecoderShape.from_config(tiny_llava.config.text_config)
    a, b = n - 32, n - 64
    layers = [llama_layer_macs(a, shape), llama_layer_macs(a, shape, n_mlp=b), *[llama_layer_macs(b, shape)] * 2]
    assert stats["prefill_flops"] == sum(layers)
    assert stats["visual_tokens_per_layer"] == [32, 32, 0, 0]
