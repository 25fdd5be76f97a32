"""Sweep pruners x budgets x benchmarks from one YAML, resumably, into a summary table and two plots.

    make sweep                                            # configs/sweep/embedded.yaml
    python scripts/sweep.py configs/sweep/embedded.yaml --out runs/sweep --data.limit=16

The YAML (paths relative to the current folder, as for `vtprune -c`):

    base: [configs/experiment/demo.yaml]     # config files of every run
    pruners: [none, random, fastv]           # `none` runs once, without a budget
    budgets: [64, 128, 192]
    # a pruner may bring its own args and budgets ([]: one run without a budget, as adaptive ones need):
    #   pruners: [{dyvte: {args: [--model.pruner.checkpoint=DIR], budgets: []}}]
    benchmarks:                              # name -> extra config files / CLI args of its runs
      shapes: []
      pope: [-c, configs/data/pope.yaml, --data.root=DIR]
    out: runs/sweep
    args: []                                 # optional: extra CLI args of every run

Each run is `vtprune validate --model.resume=true` into the fixed folder OUT/BENCHMARK/PRUNER-BUDGET
(OUT/BENCHMARK/none). The run appends each answered sample to its predictions.jsonl, so a killed
sweep, started again, answers only the samples it had not; a run whose results.json covers its
predictions is not started at all. Arguments after the YAML that the sweep does not know go to every
run. A run folder remembers its arguments (sweep_args.json) and refuses others, so that predictions
from another configuration are never mixed in: sweep a changed configuration into another OUT.

Writes OUT/summary.csv, OUT/summary.md, OUT/accuracy_vs_flops.png and OUT/accuracy_vs_latency.png
(one panel per benchmark, one line per pruner). The latency of a resumed run is measured over the
samples answered in its last process only (results.json: `latency_samples`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from lightning_modules.benchmark_metrics import Loyalty  # noqa: E402
from lightning_modules.cli import main as vtprune  # noqa: E402
from lightning_modules.predictions import read_predictions  # noqa: E402
from lightning_modules.results import write_json, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DEFAULT = ROOT / "configs" / "sweep" / "embedded.yaml"
KEYS = {"base", "pruners", "budgets", "benchmarks", "out", "args"}
# visual_tokens: what reaches the LLM's last layer; tokens_llm_input: what enters its first; tokens_layer_mean:
# the average over its layers (the count FLOPs follow). retained: accuracy / the unpruned run's accuracy.
COLUMNS = ("pruner", "budget", "benchmark", "accuracy", "retained", "loyalty", "tokens_llm_input", "visual_tokens",
           "tokens_layer_mean", "prefill_tflops", "kv_cache_mb", "prefill_latency_ms", "num_samples")  # fmt: skip


@dataclass(frozen=True)
class Run:
    benchmark: str
    pruner: str
    budget: int | None
    folder: Path
    args: list[str]  # what defines the run (configs, pruner, budget, extra arguments), not where it goes


def load_sweep(path: str | Path) -> dict:
    """The sweep YAML, checked: unknown or missing keys are errors that name them."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(KEYS)}")
    unknown, missing = set(spec) - KEYS, {"base", "pruners", "benchmarks", "out"} - set(spec)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    for entry in spec["pruners"]:
        name, own = pruner_entry(entry)
        if set(own) - {"args", "budgets"}:
            raise ValueError(f"{path}: pruner {name} has unknown keys {sorted(set(own) - {'args', 'budgets'})}")
        if name != "none" and "budgets" not in own and not spec.get("budgets"):
            raise ValueError(f"{path}: pruner {name} needs `budgets` (its own or the sweep's)")
    return spec


def pruner_entry(entry: str | dict) -> tuple[str, dict]:
    """(name, its own `args`/`budgets`) of one item of the YAML's `pruners`: a name, or {name: {...}}."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, own),) = entry.items()
        return name, dict(own or {})
    raise ValueError(f"a pruner is a name or {{name: {{args: [...], budgets: [...]}}}}, got {entry!r}")


def plan(spec: dict, out: Path, extra: list[str]) -> list[Run]:
    """Every run of the sweep, benchmark by benchmark, in the YAML's order."""
    runs = []
    for benchmark, benchmark_args in spec["benchmarks"].items():
        for pruner, own in map(pruner_entry, spec["pruners"]):
            budgets = [] if pruner == "none" else own.get("budgets", spec.get("budgets"))
            for budget in budgets or [None]:
                args = [arg for config in spec["base"] for arg in ("-c", str(config))] + list(benchmark_args or [])
                args += [f"--model.pruner={pruner}"] + ([] if budget is None else [f"--model.pruner.budget={budget}"])
                args += list(own.get("args") or [])
                args += QUIET + list(spec.get("args") or []) + extra  # the YAML's and the caller's args may undo QUIET
                folder = out / benchmark / (pruner if budget is None else f"{pruner}-{budget}")
                runs.append(Run(benchmark, pruner, budget, folder, args))
    return runs


def finished(folder: Path) -> dict | None:
    """results.json of a complete run: written last, over as many samples as predictions.jsonl holds."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    answered = results.get("resumed_samples", 0) + results.get("latency_samples", -1)
    return results if answered == len(read_predictions(folder / "predictions.jsonl")) else None


def run_once(run: Run) -> dict:
    """The run's results, running (or resuming) it unless it is complete."""
    record = run.folder / "sweep_args.json"
    if record.is_file() and json.loads(record.read_text())["args"] != run.args:
        raise SystemExit(f"{run.folder} holds a run with other arguments than {run.args}; sweep into another out")
    results = finished(run.folder)
    if results is not None:
        print(f"done already: {run.folder}")
        return results
    write_json(record, {"args": run.args})
    # A fixed log folder (no version_N below it), so that a restarted sweep finds the predictions;
    # last, so that no config file moves it.
    logger = {"class_path": "CSVLogger", "init_args": {"save_dir": str(run.folder), "name": "", "version": ""}}
    where = [
        f"--trainer.default_root_dir={run.folder}",
        f"--trainer.logger={json.dumps(logger)}",
        "--model.resume=true",
    ]
    vtprune(["validate", *run.args, *where])
    return json.loads((run.folder / "results.json").read_text())


def summary_row(run: Run, results: dict) -> dict:
    """One line of the table; figures scaled to the units papers quote."""
    flops, kv = results.get("prefill_flops"), results.get("kv_cache_bytes")
    return {
        "pruner": run.pruner,
        "budget": run.budget,
        "benchmark": run.benchmark,
        "accuracy": results.get("accuracy"),
        "retained": None,  # these two filled by `add_reference` when the sweep has a `none` run of the benchmark
        "loyalty": None,
        "tokens_llm_input": results.get("visual_tokens_llm_input"),
        "visual_tokens": results.get("visual_tokens"),
        "tokens_layer_mean": results.get("visual_tokens_layer_mean"),
        "prefill_tflops": None if flops is None else flops / 1e12,
        "kv_cache_mb": None if kv is None else kv / 2**20,
        "prefill_latency_ms": results.get("prefill_latency_ms"),
        "num_samples": results.get("num_samples"),
    }


def loyalty(folder: Path, reference: Path) -> float | None:
    """Share of a run's answers equal (VQA-normalised) to the unpruned run's on the same questions."""
    references = {str(row["id"]): row["prediction"] for row in read_predictions(reference / "predictions.jsonl")}
    rows = [row for row in read_predictions(folder / "predictions.jsonl") if str(row["id"]) in references]
    if not rows:
        return None
    metric = Loyalty(references)
    metric.update([row["prediction"] for row in rows], {"id": [row["id"] for row in rows]})
    return float(metric.compute()["loyalty"])


def add_reference(runs: list[Run], rows: list[dict]) -> None:
    """Retained accuracy share and loyalty (DESIGN: pruned vs unpruned answers) of every run, against
    the `none` run of its benchmark."""
    unpruned = {run.benchmark: (run.folder, row["accuracy"]) for run, row in zip(runs, rows) if run.pruner == "none"}
    for run, row in zip(runs, rows):
        if run.benchmark in unpruned:
            folder, accuracy = unpruned[run.benchmark]
            row["loyalty"] = loyalty(run.folder, folder)
            if accuracy and row["accuracy"] is not None:
                row["retained"] = row["accuracy"] / accuracy


def to_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def to_markdown(rows: list[dict]) -> str:
    formats = {"accuracy": ".3f", "retained": ".1%", "loyalty": ".3f", "tokens_llm_input": ".0f",
               "visual_tokens": ".1f", "tokens_layer_mean": ".1f", "prefill_tflops": ".4g",
               "kv_cache_mb": ".3f", "prefill_latency_ms": ".1f"}  # fmt: skip

    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        return format(value, formats[key]) if key in formats else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]) + "\n"


def plot(rows: list[dict], x: str, label: str, path: Path) -> Path:
    """Accuracy against `x`: one panel per benchmark, one line per pruner (its budgets, in order of x)."""
    benchmarks = list(dict.fromkeys(row["benchmark"] for row in rows))
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 4), squeeze=False)
    for ax, benchmark in zip(axes[0], benchmarks):
        points = [r for r in rows if r["benchmark"] == benchmark and r[x] is not None and r["accuracy"] is not None]
        for pruner in dict.fromkeys(r["pruner"] for r in points):
            line = sorted((r[x], r["accuracy"]) for r in points if r["pruner"] == pruner)
            ax.plot(*zip(*line), marker="o", label=pruner)
        ax.set(title=benchmark, xlabel=label, ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: a vtprune flag must never be taken for a prefix of --out.
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT), help="the sweep YAML")
    p.add_argument("--out", type=Path, help="the sweep folder (default: the YAML's `out`)")
    return p.parse_known_args(argv)  # the rest goes to every run


def sweep(argv: list[str] | None = None) -> list[dict]:
    """Run (or resume) every run of the sweep, then write the table and the plots; returns the table's rows."""
    args, extra = parse(argv)
    spec = load_sweep(args.config)
    out = args.out or Path(spec["out"])
    runs = plan(spec, out, extra)
    rows = [summary_row(run, run_once(run)) for run in runs]
    add_reference(runs, rows)
    write_text_atomic(out / "summary.csv", to_csv(rows))
    table = write_text_atomic(out / "summary.md", to_markdown(rows)).read_text()
    plot(rows, "prefill_tflops", "prefill TFLOPs (multiply-adds)", out / "accuracy_vs_flops.png")
    plot(rows, "prefill_latency_ms", "prefill latency (ms)", out / "accuracy_vs_latency.png")
    print(table)
    print(f"summary: {out / 'summary.md'}")
    return rows


if __name__ == "__main__":
    sweep()
