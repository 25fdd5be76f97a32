"""Find VTW's withdrawal layer K for a model: the paper's KL search (METHODS.md §6 "VTW", official `--findk`).

    python scripts/vtw_find_k.py --model checkpoints/tiny-llava-shapes          # 20 shapes val questions
    python scripts/vtw_find_k.py --model /models/llava-1.5-7b-hf --data .cache/shapes/test --n 20 \\
        --dtype float16 --device cuda --eta 0.003 --config configs/pruner/vtw-llava7b.yaml
    vtprune validate -c configs/experiment/demo.yaml -c configs/pruner/vtw-llava7b.yaml

For each candidate K (the paper's 5..31 of 32 layers, the start scaled to the model's depth, up to
L-1) the prefill runs with every visual token withdrawn before layer K, on N calibration questions
(default 20 of the embedded benchmark's val split, or the first N of a `questions.jsonl` folder).
KL(p_withdrawn || p_full) of the next-token distribution at the last prompt token is averaged over
the questions; the first K whose mean is at most eta (0.003, the official value for LLaVA-1.5-7B;
0.0005 for 13B, 0.0001 for LLaVA-1.6-Vicuna-7B) is chosen. The table is printed; `--config` writes
a pruner YAML with that K. Works on any local LLaVA-1.5 folder (`LlavaForConditionalGeneration`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pruners
from data.jsonl import read_questions
from data.shapes import make_sample
from lightning_modules.hf_model import chat_prompt, load_model_and_processor
from pruners.methods.vtw import PAPER_ETA, choose_k, layer_mean, search_layers, withdrawal_kl
from pruners.runtime.llava import model_info

DEFAULT_MODEL = "checkpoints/tiny-llava-shapes"


def load_questions(data: str, n: int, seed: int = 0) -> list[tuple]:
    """(image, question) pairs: `data` is "shapes" (the embedded benchmark's val split) or a JSONL folder."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if data == "shapes":
        samples = [make_sample(seed, "val", i) for i in range(n)]
        return [(s.image(), s.question) for s in samples]
    from PIL import Image

    pairs = []
    for record in read_questions(data)[:n]:
        with Image.open(record.image) as image:
            pairs.append((image.convert("RGB"), record.question))
    return pairs


@torch.no_grad()
def next_token_logits(model, processor, pairs: list[tuple], prompt: str, pruner=None) -> torch.Tensor:
    """(B, V) float32 logits of the token after each prompt, with `pruner` attached (None: the full model)."""
    texts = [chat_prompt(processor, prompt.format(question=q)) for _, q in pairs]
    inputs = processor(images=[image for image, _ in pairs], text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if pruner is None:
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()
    with pruners.attach(model, pruner):
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()  # left padding: the last slot is real


def kl_table(
    model, processor, pairs: list[tuple], ks: tuple[int, ...], prompt: str = "{question}", batch_size: int = 1
) -> dict[int, float]:
    """Mean KL(p_withdrawn || p_full) over `pairs` for each K in `ks`."""
    totals = dict.fromkeys(ks, 0.0)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        full = next_token_logits(model, processor, batch, prompt)
        for k in ks:
            withdrawn = next_token_logits(model, processor, batch, prompt, pruners.build("vtw", k=k))
            totals[k] += float(withdrawal_kl(full, withdrawn).sum())
    return {k: total / len(pairs) for k, total in totals.items()}


def format_table(table: dict[int, float], eta: float, visual: int, layers: int, chosen: int | None) -> str:
    lines = [f"{'K':>3}  {'layer-mean visual':>17}  {'KL(withdrawn||full)':>19}", "-" * 43]
    for k, kl in sorted(table.items()):
        mark = "  <= eta" + ("  <- chosen" if k == chosen else "") if kl <= eta else ""
        lines.append(f"{k:>3}  {layer_mean(k, visual, layers):>17g}  {kl:>19.6g}{mark}")
    return "\n".join(lines)


def write_config(path: Path, k: int, table: dict[int, float], args: argparse.Namespace, layers: int) -> Path:
    """A pruner YAML (configs/pruner style) fixing VTW's k; `budget: null` so k is not overridden."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# vtprune validate -c configs/experiment/demo.yaml -c {path}\n"
        f"# VTW at the layer found by scripts/vtw_find_k.py for {args.model}: the first k of {layers} layers with\n"
        f"# mean KL(p_withdrawn || p_full) <= {args.eta:g} on {args.n} questions of {args.data} "
        f"(KL {table[k]:.4g}).\n"
        "model:\n  pruner:\n    class_path: vtw\n    init_args:\n      budget: null\n"
        f"      k: {k}\n",
        encoding="utf-8",
    )
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="local Hugging Face LLaVA folder")
    p.add_argument("--data", default="shapes", help="'shapes' (embedded benchmark, val split) or a JSONL folder")
    p.add_argument("--n", type=int, default=20, help="calibration questions (official: about 20)")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed of the shapes val split")
    p.add_argument("--eta", type=float, default=PAPER_ETA, help="KL threshold (0.003: LLaVA-1.5-7B)")
    p.add_argument("--start", type=int, default=None, help="first K tried (default: 5 of 32 layers, scaled)")
    p.add_argument("--prompt", default="{question}", help="question template, as --model.prompt of vtprune")
    p.add_argument("--batch-size", type=int, default=1, help="questions per prefill (results do not depend on it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", type=Path, default=None, help="write a pruner YAML with the chosen k here")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if "{question}" not in args.prompt:
        p.error(f"--prompt must contain '{{question}}', got {args.prompt!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the search; returns {"kl": {K: mean KL}, "k": chosen K or None, "eta", "llm_layers", ...}."""
    args = parse(argv)
    model, processor = load_model_and_processor(args.model, args.dtype)
    model.to(args.device)
    info = model_info(model)
    ks = search_layers(info.llm_layers, args.start)
    pairs = load_questions(args.data, args.n, args.seed)
    table = kl_table(model, processor, pairs, ks, args.prompt, args.batch_size)
    chosen = choose_k(table, args.eta)
    print(f"VTW K search: {args.model}, {len(pairs)} questions of {args.data}, eta={args.eta:g}")
    print(format_table(table, args.eta, info.visual_tokens, info.llm_layers, chosen))
    if chosen is None:
        print(
            f"no K in {ks[0]}..{ks[-1]} meets eta={args.eta:g}: withdrawing would change the answers "
            f"(k={info.llm_layers} withdraws nothing); no config written"
        )
    else:
        print(
            f"k = {chosen} (layer-average {layer_mean(chosen, info.visual_tokens, info.llm_layers):g} visual tokens "
            f"of {info.visual_tokens}, {info.llm_layers} layers)"
        )
        if args.config is not None:
            print(f"config: {write_config(args.config, chosen, table, args, info.llm_layers)}")
    return {
        "kl": table,
        "k": chosen,
        "eta": args.eta,
        "llm_layers": info.llm_layers,
        "visual_tokens": info.visual_tokens,
        "num_questions": len(pairs),
    }


if __name__ == "__main__":
    main()
