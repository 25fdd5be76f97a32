"""A tiny, real LLaVA-1.5 model and a small shapes VQA dataset, built offline.

The model is a stock `LlavaForConditionalGeneration` (CLIP-ViT + LLaMA) with random weights and a
word-level tokenizer, saved with `save_pretrained` so it loads like any Hugging Face checkpoint.
Tests build on it, and so does the embedded benchmark's model (`data.shapes_llava`, trained and
shipped as `checkpoints/tiny-llava-shapes`).

    python -m data.tiny_llava --out DIR    # a random-weight model in DIR/model, questions in DIR/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PATCH_SIZE = 14

# LLaVA-1.5 (vicuna_v1) conversation format: "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
NUMBERS = ["one", "two", "three", "four"]
QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is in the image ?",
    "count": "how many shapes are there ?",
}
# Every word the chat template, the questions and the answers use (the normaliser lowercases).
TEMPLATE_WORDS = ["user", "assistant", "system", ":", "?", ".", ",", "answer", "with", "a", "single", "word"]
VOCAB = sorted(
    set(TEMPLATE_WORDS)
    | set(COLORS)
    | set(SHAPES)
    | set(NUMBERS)
    | {w for q in QUESTIONS.values() for w in q.split()}
)


def build_tokenizer(words: list[str] = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (lowercased, split on whitespace and punctuation)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # LLaMA prepends BOS to every sequence; the chat template does not write it.
    bos = ("<s>", SPECIAL_TOKENS.index("<s>"))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[bos])
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def build_image_processor(image_size: int = 336) -> CLIPImageProcessorPil:
    """CLIP preprocessing (resize shortest edge, centre crop) at `image_size`, PIL backend."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_processor(words: list[str] = VOCAB, image_size: int = 336) -> LlavaProcessor:
    """A `LlavaProcessor` that expands `<image>` into (image_size / 14)^2 image tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=build_tokenizer(words),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(
    vocab_size: int,
    image_token_id: int,
    image_size: int = 336,
    seed: int = 0,
    vision_layers: int = 5,
    llm_layers: int = 4,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    vision_width: int = 32,
    vision_mlp: int = 64,
    llm_width: int = 64,
    llm_mlp: int = 128,
    llm_kv_heads: int = 2,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-1.5-shaped model, small enough for CPU tests.

    The defaults leave room for every built-in pruner: LLaVA feeds the LLM from the second-to-last
    vision layer, so 5 vision layers give ToMe 4 merge steps (576 -> 64 at most halves 4 times), and
    4 LLM layers leave FastV's default cut (after layer 1) layers to act on. The widths default to
    the test models'; the trained checkpoint (`data.shapes_llava`) is wider. 4 heads everywhere.
    """
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        hidden_size=llm_width,
        intermediate_size=llm_mlp,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=llm_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def write_tiny_llava(
    folder: str | Path,
    words: list[str] = VOCAB,
    image_size: int = 336,
    seed: int = 0,
    vision_layers: int = 5,
    llm_layers: int = 4,
) -> Path:
    """Save a tiny model and its processor to `folder`; `from_pretrained(folder)` loads both."""
    folder = Path(folder)
    processor = build_processor(words, image_size)
    tok = processor.tokenizer
    model = build_tiny_llava(
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_size=image_size,
        seed=seed,
        vision_layers=vision_layers,
        llm_layers=llm_layers,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def draw_sample(rng: random.Random, image_size: int) -> tuple[Image.Image, dict[str, str]]:
    """Shapes of one colour and kind on a noise background, and the answer of each task."""
    noise = Image.frombytes("RGB", (image_size, image_size), rng.randbytes(image_size * image_size * 3))
    image = noise.point(lambda v: 60 + v * 80 // 255)  # dim grey noise, so the shapes stand out
    color, shape, count = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randrange(1, len(NUMBERS) + 1)
    draw = ImageDraw.Draw(image)
    cell = image_size // 2  # one shape per quadrant, so shapes never overlap
    for quadrant in rng.sample(range(4), count):
        x0, y0 = (quadrant % 2) * cell, (quadrant // 2) * cell
        r = rng.randrange(cell // 4, cell // 2 - 2)
        cx, cy = x0 + cell // 2, y0 + cell // 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image, {"color": color, "shape": shape, "count": NUMBERS[count - 1]}


def write_tiny_dataset(folder: str | Path, n: int = 12, image_size: int = 336, seed: int = 0) -> Path:
    """Write `n` images and one question per image (tasks in turn) as `questions.jsonl`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tasks = list(QUESTIONS)
    lines = []
    for i in range(n):
        image, answers = draw_sample(rng, image_size)
        name = f"images/{i:05d}.png"
        image.save(folder / name)
        task = tasks[i % len(tasks)]
        record = {"id": f"{i:05d}", "image": name, "question": QUESTIONS[task], "answer": answers[task], "task": task}
        lines.append(json.dumps(record))
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder; the model goes to OUT/model, the data to OUT/data")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--n", type=int, default=24, help="number of questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    model = write_tiny_llava(out / "model", image_size=args.image_size, seed=args.seed)
    data = write_tiny_dataset(out / "data", n=args.n, image_size=args.image_size, seed=args.seed)
    print(f"model: {model}\ndata:  {data / 'questions.jsonl'}")


if __name__ == "__main__":
    main()
