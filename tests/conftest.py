"""Shared fixtures: tiny real LLaVA models built from configs in code (milliseconds, no download)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import pruners
from pruners.base import ModelInfo, Stage, TokenState

# The tests' models are tiny: thread hand-offs cost more than the matmuls (one measured 24 ms on 2
# threads on a busy machine, 0.3 ms on one), so the suite runs single-threaded.
torch.set_num_threads(1)
# Without CUDA, DeepSpeed (imported when a test builds a DeepSpeed strategy) prints an accelerator-detection
# warning to stdout, into whatever a test is capturing (a --print_config); naming the CPU keeps it quiet.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

IMAGE_TOKEN = 3
PAD = 0
VOCAB = 64


def make_llava(image_size: int = 112, vision_layers: int = 3, llm_layers: int = 4, attn: str = "sdpa",
               seed: int = 0, strategy: str = "default") -> LlavaForConditionalGeneration:
    """A 2-4 layer CLIP + LLaMA LLaVA with random weights; 112 px / patch 14 = 64 visual tokens."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=llm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=PAD)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    # Larger random weights than HF's init so logits are well separated (stable greedy oracles).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.generation_config.pad_token_id = PAD
    return model


def make_inputs(model, prompt_lens: list[int], seed: int = 0, images_per_sample: int = 1) -> dict:
    """Left-padded batch: each sample = text, image tokens, text of its own length."""
    g = torch.Generator().manual_seed(seed)
    n_visual = (model.config.vision_config.image_size // 14) ** 2
    if model.config.vision_feature_select_strategy == "full":
        n_visual += 1
    rows = []
    for plen in prompt_lens:
        head = torch.randint(4, VOCAB, (2,), generator=g).tolist()
        tail = torch.randint(4, VOCAB, (plen,), generator=g).tolist()
        rows.append(head + [IMAGE_TOKEN] * n_visual * images_per_sample + tail)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(rows) * images_per_sample, 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


LLAVA15_INFO = dict(
    family="llava", visual_tokens=576, grid=(24, 24), vision_layers=24, vision_feature_layer=23, llm_layers=32,
    has_cls=True,
)


def llava15_info(**changes) -> ModelInfo:
    """What a pruner is told about LLaVA-1.5-7B (CLIP-L/336, Vicuna-7B), with fields changed."""
    return ModelInfo(**{**LLAVA15_INFO, **changes})


def setup_pruner(name: str, model: ModelInfo, **kwargs) -> pruners.Pruner:
    """`pruners.build(name, **kwargs)`, set up for `model` as `attach` would."""
    pruner = pruners.build(name, **kwargs)
    pruner.setup(model)
    return pruner


def vision_state(hidden: torch.Tensor, grid: tuple[int, int], probe=None) -> TokenState:
    """The state a VISION_LAYER hook gets after vision layer 0: slot 0 = CLS, slot 1 + p = patch p."""
    bsz, n, _ = hidden.shape
    slots = torch.arange(n).expand(bsz, n)
    return TokenState(
        hidden=hidden, valid=torch.ones(bsz, n, dtype=torch.bool), visual=slots > 0, positions=slots - 1,
        origin=slots, sizes=torch.ones(bsz, n), stage=Stage.VISION_LAYER, layer=0, grid=grid, probe=probe,
    )


def generate_new_tokens(model, inputs: dict, pruner=None, report: bool = False, new_tokens: int = 4, **kw):
    """The last `new_tokens` greedy tokens, with `pruner` attached if given (and its report as a dict when
    `report`). min_new_tokens: an early EOS would end a lone sample's output but pad a batched one."""
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, **kw}
    with torch.no_grad():
        if pruner is None:
            return model.generate(**inputs, **kw)[:, -new_tokens:]
        with pruners.attach(model, pruner) as rep:
            out = model.generate(**inputs, **kw)[:, -new_tokens:]
    return (out, rep.as_dict()) if report else out


def slice_inputs(inputs: dict, i: int, images_per_sample: int = 1) -> dict:
    """Sample i alone, padding removed."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        "pixel_values": inputs["pixel_values"][i * images_per_sample:(i + 1) * images_per_sample],
    }


@pytest.fixture(scope="session")
def tiny_llava():
    return make_llava()


def write_shapes_model(folder, seed: int = 0):
    """A narrow random LLaVA with the shapes benchmark's vocabulary (576 visual tokens), saved with its
    processor into `folder`. Its LM head gives special tokens a zero logit, so greedy answers are words
    (comparable answers, not empty strings)."""
    from data.shapes_llava import build_shapes_llava, shapes_processor

    processor = shapes_processor()
    model = build_shapes_llava(processor, seed=seed, vision_layers=2, vision_width=32, vision_mlp=64, llm_width=64,
                               llm_mlp=96, llm_kv_heads=2)  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight[processor.tokenizer.all_special_ids] = 0.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
