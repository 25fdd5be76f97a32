"""The main job: validate the seed pruners at 64/128/192 tokens on the embedded default.

    make demo                      # or: python scripts/demo.py --pruners fastv pool --budgets 64
    python scripts/demo.py --out runs/demo

Each run is `vtprune validate -c configs/experiment/demo.yaml --model.pruner=NAME
--model.pruner.budget=B`, writing results.json under OUT/NAME-B; a finished run is not redone
when the demo is restarted. The summary table is printed and written to OUT/summary.md.

Until the embedded benchmark and its trained model ship (`checkpoints/tiny-llava-shapes`), the
demo runs on a tiny LLaVA with RANDOM weights and a small shapes dataset written into .cache/demo:
its accuracies are meaningless; the token, FLOPs, KV-cache and latency columns are real.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from data.tiny_llava import write_tiny_dataset, write_tiny_llava
from lightning_modules.cli import main as vtprune

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiment" / "demo.yaml"
COLUMNS = ("pruner", "budget", "accuracy", "by task", "visual tokens", "prefill TFLOPs", "KV cache MB", "latency ms")


def ensure_demo_files(cache: Path, questions: int) -> None:
    """The stand-in model and dataset, written once into the cache folder."""
    if not (cache / "demo" / "model" / "config.json").is_file():
        write_tiny_llava(cache / "demo" / "model")
    if not (cache / "demo" / "data" / "questions.jsonl").is_file():
        write_tiny_dataset(cache / "demo" / "data", n=questions)


def run_one(name: str, budget: int | None, out: Path) -> dict:
    folder = out / (name if budget is None else f"{name}-{budget}")
    done = list(folder.rglob("results.json"))
    if not done:
        args = ["validate", "-c", str(CONFIG), f"--model.pruner={name}", f"--trainer.default_root_dir={folder}",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        vtprune(args + ([] if budget is None else [f"--model.pruner.budget={budget}"]))
        done = list(folder.rglob("results.json"))
    return json.loads(done[0].read_text())


def row(r: dict) -> list[str]:
    tasks = " ".join(f"{t}={v:.2f}" for t, v in sorted(r["accuracy_by_task"].items()) if v is not None)
    return [r["pruner"], str(r["budget"] or "-"), f"{r['accuracy']:.3f}", tasks, f"{r['visual_tokens']:.0f}",
            f"{r['prefill_flops'] / 1e12:.3g}", f"{r['kv_cache_bytes'] / 2**20:.3f}", f"{r['prefill_latency_ms']:.1f}"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=["random", "pool", "fastv", "tome"])
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--questions", type=int, default=48, help="questions in the stand-in dataset")
    return p.parse_args(argv)


def demo(argv: list[str] | None = None) -> str:
    args = parse(argv)
    cache = Path(os.environ.get("VTPRUNE_CACHE", ROOT / ".cache"))
    ensure_demo_files(cache, args.questions)
    results = [run_one("none", None, args.out)]
    results += [run_one(name, b, args.out) for name in args.pruners for b in args.budgets]
    table = markdown([row(r) for r in results])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(table)
    print(table)
    print(f"summary: {args.out / 'summary.md'}")
    return table


if __name__ == "__main__":
    demo()
