"""Load a Hugging Face MLLM and its processor from a local folder, with errors that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from pruners.runtime import supported_families

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_architecture(path: Path) -> str:
    """The architecture named in `path/config.json`; raises if it is not a family the runtime supports."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {path} does not exist (relative paths are from {Path.cwd()}); give "
            "--model.model_name_or_path a local Hugging Face folder, e.g. checkpoints/tiny-llava-shapes"
        )
    if not config_file.is_file():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no config.json (found: {found})")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    supported = supported_families()
    for arch in architectures:
        if arch in supported:
            return arch
    raise ValueError(
        f"{path} holds a model of type {config.get('model_type')!r} with architectures {architectures}; "
        f"vtprune supports {supported}"
    )


def load_model_and_processor(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model in eval mode, processor) from a local folder; nothing is downloaded."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model_class = getattr(transformers, model_architecture(path))
    model = model_class.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True
    )
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"the processor in {path} has no chat template, so prompts cannot be built")
    # Batched generation needs padding on the left, so every prompt ends where generation starts.
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def chat_prompt(processor, text: str) -> str:
    """The processor's chat template around one image and `text`, ready for generation."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
