"""The tiny LLaVA-1.5 of the shapes benchmark: its word-level processor and its (untrained) shape.

`lightning_modules.vision_pretraining` trains its vision tower and `lightning_modules.qa_finetuning`
its projector and decoder; the result ships in `checkpoints/tiny-llava-shapes`.

Sizes: a CLIP tower at 336 px / patch 14 (577 tokens with CLS) of 6 layers, width 96; LLaVA-1.5
takes features from layer -2, so 5 layers feed the LLM and the last one only serves the CLS
pre-training. A 2-layer GELU MLP projector. A LLaMA decoder of 4 layers, width 128, 4 heads
without grouping (as Vicuna). About 2 M parameters in all: small enough to train on 2 CPU cores.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from data.shapes_questions import vocabulary
from data.tiny_llava import build_processor, build_tiny_llava

CHAT_WORDS = ["user", "assistant", ":"]  # the words the chat template adds around a question
# Words only the grounded tokens use ("," background, "." an object's centre; `lightning_modules.grounding`).
GROUNDING_WORDS = [",", "."]
SIZES = {
    "vision_layers": 6,
    "vision_width": 96,
    "vision_mlp": 384,
    "llm_layers": 4,
    "llm_width": 128,
    "llm_mlp": 384,
    "llm_kv_heads": 4,
}


def shapes_processor() -> LlavaProcessor:
    """The processor: CLIP preprocessing at 336 px and a tokenizer over every benchmark word, the chat
    template's and those of the grounded tokens."""
    return build_processor(sorted(set(vocabulary()) | set(CHAT_WORDS) | set(GROUNDING_WORDS)), image_size=336)


def build_shapes_llava(processor: LlavaProcessor, seed: int = 0, **sizes: int) -> LlavaForConditionalGeneration:
    """A randomly initialised model of the checkpoint's shape (`SIZES`, overridable) for `processor`."""
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown size(s) {sorted(unknown)}; known: {sorted(SIZES)}")
    tok = processor.tokenizer
    return build_tiny_llava(
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_size=336,
        seed=seed,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **{**SIZES, **sizes},
    )
