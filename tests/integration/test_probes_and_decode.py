"""Attention probes equal eager attention weights; the DECODE stage really cuts the KV cache."""

from __future__ import annotations

import torch
from conftest import make_inputs, make_llava
from transformers import DynamicCache

import pruners
from pruners.base import Pruner, Stage


class Recorder(Pruner):
    """Test pruner: records the probe's attention at one vision and one LLM layer, cuts nothing."""

    name = "test-recorder"
    stages = frozenset({Stage.VISION_LAYER, Stage.LLM_LAYER})

    def __init__(self, vision_layer: int, llm_layer: int) -> None:
        super().__init__()
        self.vision_layers, self.llm_layers = (vision_layer,), (llm_layer,)
        self.seen: dict[str, torch.Tensor] = {}

    def vision_layer(self, state):
        rows = torch.arange(state.num_tokens).expand(state.batch_size, -1)
        self.seen["vision"] = state.attention(rows, heads="none")
        return state

    def llm_layer(self, state):
        rows = torch.arange(state.num_tokens).expand(state.batch_size, -1)
        self.seen["llm"] = state.attention(rows, heads="none")
        self.seen["llm_last_mean"] = state.attention(state.last_index()[:, None])
        return state


def test_probe_equals_eager_attention():
    model = make_llava(attn="eager", seed=5)
    inputs = make_inputs(model, [3, 7])
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
        vision_ref = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
        rec = Recorder(vision_layer=1, llm_layer=2)
        with pruners.attach(model, rec):
            model(**inputs)
    real = inputs["attention_mask"].bool()
    llm_ref = ref.attentions[2]  # (B, H, L, L)
    for b in range(2):
        rows = real[b].nonzero()[:, 0]
        got = rec.seen["llm"][b][:, rows][:, :, rows]
        want = llm_ref[b][:, rows][:, :, rows]
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(rec.seen["llm_last_mean"][:, 0], llm_ref[:, :, -1].mean(1), atol=1e-5)
    assert torch.allclose(rec.seen["vision"], vision_ref[1], atol=1e-5)


def test_probe_keeps_model_on_sdpa(tiny_llava):
    rec = Recorder(vision_layer=0, llm_layer=1)
    with torch.no_grad(), pruners.attach(tiny_llava, rec):
        tiny_llava(**make_inputs(tiny_llava, [4]))
    assert tiny_llava.config.text_config._attn_implementation == "sdpa"
    assert tiny_llava.config.vision_config._attn_implementation == "sdpa"


class DropVisualCache(Pruner):
    """Test DECODE pruner: at the first decoding step, evict every visual entry of every layer."""

    name = "test-drop-visual-cache"
    stages = frozenset({Stage.DECODE})

    def decode(self, cache):
        if cache.step != 0:
            return
        for layer in range(cache.num_layers):
            slots = cache.slots(layer)
            cache.keep(layer, pruners.ops.compact_index(slots.valid & ~slots.visual))


def reference_drop_visual(model, inputs, steps: int) -> list[int]:
    """The same policy through Hugging Face's own forward: crop the cache by hand, then decode."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = model(**inputs, use_cache=True)
    text = ~(ids[0] == model.config.image_token_id)
    cache = DynamicCache(config=model.config.text_config)
    for i, layer in enumerate(out.past_key_values.layers):
        cache.update(layer.keys[:, :, text], layer.values[:, :, text], i)
    tokens, pos, keep_mask = [out.logits[0, -1].argmax().item()], ids.shape[1], mask[:, text]
    for _ in range(steps - 1):
        keep_mask = torch.cat([keep_mask, torch.ones(1, 1, dtype=keep_mask.dtype)], 1)
        step = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=keep_mask,
                     position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        tokens.append(step.logits[0, -1].argmax().item())
        pos += 1
    return tokens


def test_decode_stage_cuts_cache_like_hf_reference():
    model = make_llava(seed=2)
    inputs = make_inputs(model, [6])
    with torch.no_grad():
        want = reference_drop_visual(model, inputs, steps=5)
        with pruners.attach(model, DropVisualCache()) as report:
            got = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, -5:].tolist()
        unpruned = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, -5:].tolist()
    assert got == want
    assert got != unpruned  # the eviction mattered on this input
    stats = report.as_dict()
    assert stats["kv_cache_bytes"] < stats["kv_cache_bytes_prefill"]
