"""Prefill speed and memory of pruners against `none`, measured side by side in one run.

    make bench                       # LLaVA-1.5-shaped: width 4096, SwiGLU 11008, 576 visual tokens
    python scripts/bench_speed.py --pruners fastv pool tome --budgets 64 128 192 --layers 4
    make bench ARGS="--family llava-next"   # LLaVA-NeXT-shaped: 2,880 visual tokens (base + 2 x 2 crops)

The model has LLaVA-1.5-7B's decoder width (4096, 32 heads, MLP 11008) with a few layers, and a
CLIP-L-width vision tower (1024) at 336 px / patch 14 (576 visual tokens) with few layers, random
weights, no download. For each pruner and budget it prints the FLOPs-predicted prefill speedup
(vision + LLM multiply-adds of `none` over the pruner's) beside the measured one (median wall
clock of the full prefill forward), their ratio, the pruner's own hook time as a share of the
unpruned prefill, and peak memory (CUDA: max allocated; CPU: peak resident-set growth).

`--family llava-next` builds a LLaVA-NeXT (`LlavaNextForConditionalGeneration`) of the same shapes whose
image is square at twice the tile size, so it takes the 2 x 2 grid pinpoint with nothing unpadded: base
576 + 4 crops of 576 = 2,880 visual tokens (HF puts 2,928 image tokens in the text: 48 row-end newlines
too, which the pruners keep and the token column does not count). Its budgets count the whole image
(default 160, 320, 640, the papers' LLaVA-NeXT settings) and its pruners are those the support matrix runs
on LLaVA-NeXT.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import pruners
from pruners import registry
from pruners.runtime import runnable
from pruners.runtime.llava_next import image_layout

IMAGE_TOKEN = 3
OVERHEAD_LIMIT = 0.15  # a pruner's own work may cost at most this share of the unpruned prefill
FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration"}
NEXT_PINPOINTS = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]  # LLaVA-NeXT's grid pinpoints, in tiles


def build_model(layers: int, width: int, mlp: int, heads: int, vision_width: int, vision_layers: int,
                image_size: int, dtype: torch.dtype, device: str, family: str = "llava"):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_width // 64),
                              image_size=image_size, patch_size=14)
    text = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=1024, max_position_embeddings=4096)
    if family == "llava-next":
        pinpoints = [[h * image_size, w * image_size] for h, w in NEXT_PINPOINTS]
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                              vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
        model_class = LlavaNextForConditionalGeneration
    else:
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
        model_class = LlavaForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = model_class(cfg)
    return model.to(dtype).eval()


def make_inputs(model, device: str, prefix: int = 35, suffix: int = 40) -> dict:
    """LLaVA-1.5 layout: 35 system tokens, the image tokens, then the question. LLaVA-NeXT: the same around a
    square image of 2 x 2 tiles (its 5 views as pixel_values, its size as image_sizes)."""
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    extra = {}
    if isinstance(model, LlavaNextForConditionalGeneration):
        image = torch.tensor([[2 * size, 2 * size]])
        visual = image_layout(image[0], model.config.image_grid_pinpoints, size, size // 14).length
        pixels = torch.randn(1, 5, 3, size, size, generator=g)
        extra = {"image_sizes": image.to(device)}
    else:
        visual = (size // 14) ** 2
        pixels = torch.randn(1, 3, size, size, generator=g)
    ids = torch.cat([torch.randint(4, 1024, (prefix,), generator=g), torch.full((visual,), IMAGE_TOKEN),
                     torch.randint(4, 1024, (suffix,), generator=g)])[None]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(model.dtype).to(device), **extra}


class PeakMemory:
    """Peak memory growth during a block: CUDA max allocated, or resident set size on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim_heap() -> None:
    """Give freed heap back to the OS so each run's RSS growth is its own (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(model, inputs, pruner, reps: int, device: str) -> dict:
    """Median prefill wall clock, peak memory and the report of one pruner."""
    times = []
    with torch.no_grad(), pruners.attach(model, pruner) as report:
        model(**inputs, logits_to_keep=1)  # warm-up
        report.reset()
        for _ in range(reps):
            with PeakMemory(device) as mem:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
    stats = report.as_dict()
    return {"ms": statistics.median(times), "mem": mem.mib, "flops": stats["prefill_flops"] + stats["vision_flops"],
            "tokens": stats["visual_tokens"], "pruner_ms": stats["pruner_latency_ms"]}


def run(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.width, args.mlp, args.heads, args.vision_width, args.vision_layers,
                        args.image_size, dtype, args.device, args.family)
    inputs = make_inputs(model, args.device)
    base = measure(model, inputs, pruners.build("none"), args.reps, args.device)
    rows = [{"pruner": "none", "budget": "-", **base, "pred": 1.0, "meas": 1.0}]
    for name in args.pruners:
        for budget in args.budgets:
            res = measure(model, inputs, pruners.build(name, budget=budget), args.reps, args.device)
            rows.append({"pruner": name, "budget": budget, **res, "pred": base["flops"] / res["flops"],
                         "meas": base["ms"] / res["ms"]})
    for row in rows:
        row["share"] = row["pruner_ms"] / base["ms"]
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"# {args.family} prefill on {args.device} ({torch.get_num_threads()} threads), "
          f"decoder {args.layers} x width {args.width}"
          f" (MLP {args.mlp}), vision {args.vision_layers} x {args.vision_width}, {args.dtype}, median of {args.reps}")
    head = (f"{'pruner':<14}{'budget':>7}{'tokens':>8}{'GMACs':>9}{'pred x':>8}{'ms':>10}{'meas x':>8}"
            f"{'meas/pred':>11}{'hook %':>8}{'peak MiB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['pruner']:<14}{r['budget']!s:>7}{r['tokens']:>8.0f}{r['flops'] / 1e9:>9.2f}{r['pred']:>8.2f}"
              f"{r['ms']:>10.1f}{r['meas']:>8.2f}{r['meas'] / r['pred']:>11.2f}{100 * r['share']:>8.2f}"
              f"{r['mem']:>10.1f}")
    over = [f"{r['pruner']}@{r['budget']}" for r in rows if r["share"] > OVERHEAD_LIMIT]
    print(f"hook % = the pruner's own scoring/merging time over the unpruned prefill; over "
          f"{OVERHEAD_LIMIT:.0%}: {', '.join(over) or 'none'}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llava", choices=sorted(FAMILIES),
                   help="llava: LLaVA-1.5 (576 visual tokens); llava-next: LLaVA-NeXT (2,880 = base + 2 x 2 crops)")
    p.add_argument("--pruners", nargs="+", default=None,
                   help="default: every registered pruner with a budget that runs on the family")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="visual tokens per image; default 64 128 192 (llava), 160 320 640 (llava-next)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vision-width", type=int, default=1024)
    p.add_argument("--vision-layers", type=int, default=6,
                   help="CLIP layers (LLaVA feeds layer -2's input; ToMe needs 4 merging layers to reach 64)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.pruners is None:  # adaptive pruners (DyVTE) take no budget to sweep
        args.pruners = [n for n in runnable(FAMILIES[args.family]) if n != "none" and not registry.get(n).adaptive]
    if args.budgets is None:
        args.budgets = [160, 320, 640] if args.family == "llava-next" else [64, 128, 192]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    rows = run(args)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()
