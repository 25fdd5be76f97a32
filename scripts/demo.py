"""The main job: validate the seed pruners at 64/128/192 tokens, and the four core methods (MustDrop, G-Prune,
FiCoCo-V/L/VL, TokenCarve) at 64, on the embedded default.

    make demo                                    # 500 test questions per run, about 10 min on 2 cores
    make demo ARGS=--full                        # the whole test split (3,000 questions)
    python scripts/demo.py --pruners fastv pool --budgets 64 --core --out runs/demo   # no core methods
    python scripts/demo.py --core gprune tokencarve --core-budgets 64 128

The core methods run at one budget by default to keep the demo short; `make sweep` has every pruner at every
budget.

Each run is `vtprune validate -c configs/experiment/demo.yaml --model.pruner=NAME
--model.pruner.budget=B` (the shipped tiny LLaVA on the shapes test split), writing results.json
under OUT/NAME-B; a finished run is not redone when the demo is restarted. The table is printed and
written to OUT/summary.md, with an accuracy-versus-prefill-FLOPs plot in OUT/accuracy_vs_flops.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.shapes_questions import FAMILIES
from lightning_modules.cli import main as vtprune

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiment" / "demo.yaml"
CORE = ["mustdrop", "gprune", "ficoco-v", "ficoco-l", "ficoco-vl", "tokencarve"]
COLUMNS = ("pruner", "budget", "accuracy", *FAMILIES, "visual tokens", "prefill TFLOPs", "KV cache MB", "latency ms")


def run_one(name: str, budget: int | None, out: Path, extra: list[str]) -> dict:
    folder = out / (name if budget is None else f"{name}-{budget}")
    done = list(folder.rglob("results.json"))
    if not done:
        args = ["validate", "-c", str(CONFIG), f"--model.pruner={name}", f"--trainer.default_root_dir={folder}",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]
        vtprune(args + ([] if budget is None else [f"--model.pruner.budget={budget}"]))
        done = list(folder.rglob("results.json"))
    return json.loads(done[0].read_text())


def row(r: dict) -> list[str]:
    by_task = r["accuracy_by_task"]
    families = [f"{by_task[f]:.2f}" if by_task.get(f) is not None else "-" for f in FAMILIES]
    return [r["pruner"], str(r["budget"] or "-"), f"{r['accuracy']:.3f}", *families, f"{r['visual_tokens']:.0f}",
            f"{r['prefill_flops'] / 1e12:.4f}", f"{r['kv_cache_bytes'] / 2**20:.2f}", f"{r['prefill_latency_ms']:.1f}"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def plot(results: list[dict], path: Path) -> Path:
    """Accuracy against prefill FLOPs: one line per pruner over its budgets, `none` as a star."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["pruner"] for r in results):
        runs = sorted((r for r in results if r["pruner"] == name), key=lambda r: r["prefill_flops"])
        x, y = [r["prefill_flops"] / 1e9 for r in runs], [r["accuracy"] for r in runs]
        ax.plot(x, y, "*" if name == "none" else "o-", label=name, markersize=12 if name == "none" else 5)
    ax.set_xlabel("prefill GFLOPs per sample")
    ax.set_ylabel("accuracy")
    ax.set_title(f"tiny LLaVA on shapes ({results[0]['num_samples']} test questions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=["random", "pool", "fastv", "tome"])
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192])
    p.add_argument("--core", nargs="*", default=CORE, help="core methods (default: all six; none after the flag)")
    p.add_argument("--core-budgets", nargs="+", type=int, default=[64], help="their budgets (default 64)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--questions", type=int, default=500, help="test questions per run (default 500)")
    p.add_argument("--full", action="store_true", help="score the whole test split (3,000 questions)")
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "tiny-llava-shapes",
                   help="model folder (default: the shipped checkpoint)")
    return p.parse_args(argv)


def demo(argv: list[str] | None = None) -> str:
    args = parse(argv)
    extra = [f"--model.model_name_or_path={args.model.resolve()}"]  # absolute: the demo runs from any folder
    extra += [] if args.full else [f"--data.init_args.limit={args.questions}"]
    results = [run_one("none", None, args.out, extra)]
    results += [run_one(name, b, args.out, extra) for name in args.pruners for b in args.budgets]
    results += [run_one(name, b, args.out, extra) for name in args.core for b in args.core_budgets]
    table = markdown([row(r) for r in results])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(table)
    png = plot(results, args.out / "accuracy_vs_flops.png")
    print(table)
    print(f"summary: {args.out / 'summary.md'}\nplot:    {png}")
    return table


if __name__ == "__main__":
    demo()
