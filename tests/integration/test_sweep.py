"""`scripts/sweep.py`: a killed sweep, restarted, gives the uninterrupted sweep's table and answers no sample twice."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import pruners
from data.tiny_llava import write_tiny_dataset, write_tiny_llava
from lightning_modules.benchmark_metrics import normalize_vqa_answer
from lightning_modules.module import PrunedMLLM
from lightning_modules.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402

QUESTIONS, BATCH = 8, 2  # four batches per run
RUNS = ("none", "pool-16", "pool-32")
TIMED = "prefill_latency_ms"  # the one column a rerun measures anew


@pytest.fixture(scope="module")
def sweep_yaml(tmp_path_factory) -> Path:
    """A sweep over a 112-px random tiny LLaVA (64 visual tokens) and eight jsonl questions."""
    root = tmp_path_factory.mktemp("sweep")
    write_tiny_llava(root / "model", image_size=112, seed=0)
    write_tiny_dataset(root / "data", n=QUESTIONS, image_size=112, seed=0)
    base = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
        "model": {"model_name_or_path": str(root / "model"), "pruner": "none", "max_new_tokens": 4},
        "data": {"class_path": "JsonlBenchmark", "init_args": {"root": str(root / "data"), "batch_size": BATCH}},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": [str(root / "tiny.yaml")], "pruners": ["none", "pool"], "budgets": [16, 32],
            "benchmarks": {"tiny": []}, "out": str(root / "unused")}  # fmt: skip
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return root / "sweep.yaml"


@pytest.fixture
def generated(monkeypatch) -> list[int]:
    """Samples per call of `PrunedMLLM.answer` (the only place that generates)."""
    calls: list[int] = []
    answer = PrunedMLLM.answer

    def counting(self, images, questions):
        calls.append(len(questions))
        return answer(self, images, questions)

    monkeypatch.setattr(PrunedMLLM, "answer", counting)
    return calls


@pytest.fixture(scope="module")
def reference(sweep_yaml, tmp_path_factory) -> Path:
    """The uninterrupted sweep's folder."""
    out = tmp_path_factory.mktemp("reference")
    sweep.sweep([str(sweep_yaml), "--out", str(out)])
    return out


def table(out: Path) -> list[dict]:
    """summary.csv without the measured latency (everything else is a function of the answers and tokens)."""
    with (out / "summary.csv").open() as file:
        return [{k: v for k, v in row.items() if k != TIMED} for row in csv.DictReader(file)]


def predictions(folder: Path) -> dict[str, str]:
    rows = read_predictions(folder / "predictions.jsonl")
    assert len(rows) == len({row["id"] for row in rows}), "a sample answered twice"
    return {row["id"]: row["prediction"] for row in rows}


def test_uninterrupted_sweep(reference):
    rows = table(reference)
    assert [(r["pruner"], r["budget"], r["benchmark"]) for r in rows] == [
        ("none", "", "tiny"), ("pool", "16", "tiny"), ("pool", "32", "tiny")]  # fmt: skip
    assert [float(r["visual_tokens"]) for r in rows] == [64, 16, 32]
    assert all(int(r["num_samples"]) == QUESTIONS for r in rows)
    assert float(rows[0]["prefill_tflops"]) > float(rows[2]["prefill_tflops"]) > float(rows[1]["prefill_tflops"])
    assert (reference / "summary.md").read_text().startswith("| pruner | budget | benchmark | accuracy | retained |")
    for row in rows:  # retained: accuracy as a share of the unpruned run's
        expected = float(row["accuracy"]) / float(rows[0]["accuracy"]) if float(rows[0]["accuracy"]) else None
        assert row["retained"] == "" if expected is None else float(row["retained"]) == pytest.approx(expected)
    assert [float(r["tokens_llm_input"]) for r in rows] == [64, 16, 32]  # pool acts before the LLM
    unpruned = predictions(reference / "tiny" / "none")
    for row, run in zip(rows, RUNS):  # loyalty: agreement with the unpruned run's answers
        answers = predictions(reference / "tiny" / run)
        same = sum(normalize_vqa_answer(answers[i]) == normalize_vqa_answer(unpruned[i]) for i in unpruned)
        assert float(row["loyalty"]) == pytest.approx(same / len(unpruned))
    assert float(rows[0]["loyalty"]) == 1.0
    for name in ("accuracy_vs_flops.png", "accuracy_vs_latency.png"):
        assert (reference / name).read_bytes().startswith(b"\x89PNG")
    for run in RUNS:  # fixed folders, no version_N below them
        results = json.loads((reference / "tiny" / run / "results.json").read_text())
        assert results["resumed_samples"] == 0 and results["latency_samples"] == QUESTIONS


def test_finished_sweep_is_not_rerun(sweep_yaml, reference, generated):
    before = (reference / "summary.csv").read_text()
    stamp = (reference / "tiny" / "pool-16" / "results.json").stat().st_mtime_ns
    sweep.sweep([str(sweep_yaml), "--out", str(reference)])
    assert generated == [] and (reference / "summary.csv").read_text() == before
    assert (reference / "tiny" / "pool-16" / "results.json").stat().st_mtime_ns == stamp


def test_killed_sweep_resumes_without_redoing_samples(sweep_yaml, reference, tmp_path, monkeypatch, generated):
    """Killed in the third batch of the second run; the restart answers exactly the samples not yet on disk."""
    counting = PrunedMLLM.answer

    def dies_in_call_7(self, images, questions):
        if len(generated) == 6:  # 4 batches of run 1, 2 of run 2
            raise RuntimeError("killed")
        return counting(self, images, questions)

    monkeypatch.setattr(PrunedMLLM, "answer", dies_in_call_7)
    with pytest.raises(RuntimeError, match="killed"):
        sweep.sweep([str(sweep_yaml), "--out", str(tmp_path)])
    assert sum(generated) == QUESTIONS + 2 * BATCH
    assert len(read_predictions(tmp_path / "tiny" / "pool-16" / "predictions.jsonl")) == 2 * BATCH
    assert not (tmp_path / "tiny" / "pool-16" / "results.json").exists()

    monkeypatch.setattr(PrunedMLLM, "answer", counting)
    generated.clear()
    sweep.sweep([str(sweep_yaml), "--out", str(tmp_path)])
    assert sum(generated) == 3 * QUESTIONS - QUESTIONS - 2 * BATCH  # the rest of run 2 and all of run 3
    assert table(tmp_path) == table(reference)
    for run in RUNS:
        assert predictions(tmp_path / "tiny" / run) == predictions(reference / "tiny" / run)
    resumed = json.loads((tmp_path / "tiny" / "pool-16" / "results.json").read_text())
    assert resumed["resumed_samples"] == 2 * BATCH and resumed["latency_samples"] == QUESTIONS - 2 * BATCH


def test_torn_last_line_is_answered_again(sweep_yaml, reference, tmp_path, generated):
    """A kill while appending leaves half a line: it is dropped and only that sample and the later ones rerun."""
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    run = out / "tiny" / "pool-32"
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run / "predictions.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (run / "results.json").unlink()
    sweep.sweep([str(sweep_yaml), "--out", str(out)])
    assert sum(generated) == QUESTIONS - 3
    assert table(out) == table(reference)
    assert predictions(run) == predictions(reference / "tiny" / "pool-32")


def test_read_predictions_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "1"}\n{"id": "2"}\n{"id": ')
    assert read_predictions(path) == [{"id": "1"}, {"id": "2"}]
    path.write_text('{"id": "1"}\n{"id": \n{"id": "3"}\n')
    with pytest.raises(ValueError, match="predictions.jsonl:2"):
        read_predictions(path)
    assert read_predictions(tmp_path / "missing.jsonl") == []


def test_run_folder_refuses_other_arguments(sweep_yaml, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    with pytest.raises(SystemExit, match="other arguments"):
        sweep.sweep([str(sweep_yaml), "--out", str(out), "--model.max_new_tokens=2"])


def assert_shipped_checkpoints(entries: dict) -> None:
    """The learned pruners of a sweep's entries load checkpoint folders that the repository ships."""
    for name in ("gate", "dyvte"):
        (folder,) = [a.split("=", 1)[1] for a in entries[name]["args"] if a.startswith("--model.pruner.checkpoint=")]
        assert (ROOT / folder / "pruner.json").is_file(), folder


def test_embedded_sweep_lists_every_pruner():
    # Every registered pruner; the learned ones load the checkpoints shipped for the tiny LLaVA, and the
    # adaptive DyVTE runs once, without a budget.
    spec = sweep.load_sweep(ROOT / "configs" / "sweep" / "embedded.yaml")
    entries = dict(sweep.pruner_entry(entry) for entry in spec["pruners"])
    assert sorted(entries) == sorted(pruners.available()) and spec["budgets"] == [64, 128, 192]
    assert all((ROOT / config).is_file() for config in spec["base"])
    assert_shipped_checkpoints(entries)
    runs = sweep.plan(spec, Path("out"), [])
    assert len(runs) == 1 + 3 * (len(pruners.available()) - 2) + 1
    assert runs[0].folder == Path("out/shapes/none") and "--model.pruner.budget=64" in runs[1].args
    assert runs[-1].folder == Path("out/shapes/dyvte")


def test_core_full_sweep_covers_the_core_methods_on_the_whole_test_split():
    spec = sweep.load_sweep(ROOT / "configs" / "sweep" / "core_full.yaml")
    names = [sweep.pruner_entry(entry)[0] for entry in spec["pruners"]]
    core = {"mustdrop", "gprune", "ficoco-v", "ficoco-l", "ficoco-vl", "tokencarve", "none", "fastv", "random", "pool"}
    assert set(names) == core and set(names) <= set(pruners.available())
    assert spec["benchmarks"]["shapes"] == ["--data.init_args.limit=3000"] and spec["budgets"] == [64, 128, 192]


def test_learned_full_sweep_runs_the_shipped_checkpoints_on_the_whole_test_split():
    spec = sweep.load_sweep(ROOT / "configs" / "sweep" / "learned_full.yaml")
    entries = dict(sweep.pruner_entry(entry) for entry in spec["pruners"])
    assert sorted(entries) == ["dyvte", "fastv", "gate", "none"] and entries["dyvte"]["budgets"] == []
    assert_shipped_checkpoints(entries)
    assert spec["benchmarks"]["shapes"] == ["--data.init_args.limit=3000"]


def test_full_sweep_is_the_embedded_one_on_the_whole_split_and_reuses_the_partial_ones():
    full = sweep.load_sweep(ROOT / "configs" / "sweep" / "full.yaml")
    embedded = sweep.load_sweep(ROOT / "configs" / "sweep" / "embedded.yaml")
    assert full["pruners"] == embedded["pruners"] and full["base"] == embedded["base"]
    assert full["benchmarks"]["shapes"] == ["--data.init_args.limit=3000"]
    # a run core_full or learned_full made has the same folder and arguments here, so it is not repeated
    runs = {run.folder: run.args for run in sweep.plan(full, Path(full["out"]), [])}
    for part in ("core_full.yaml", "learned_full.yaml"):
        spec = sweep.load_sweep(ROOT / "configs" / "sweep" / part)
        assert spec["out"] == full["out"]
        for run in sweep.plan(spec, Path(spec["out"]), []):
            assert runs[run.folder] == run.args, run.folder


def test_pruner_entries_bring_their_own_args_and_budgets(tmp_path):
    spec = {"base": ["b.yaml"], "budgets": [64, 128], "benchmarks": {"shapes": []}, "out": "o",
            "pruners": ["none", {"gate": {"args": ["--model.pruner.checkpoint=G"]}},
                        {"dyvte": {"args": ["--model.pruner.checkpoint=D"], "budgets": []}}]}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    runs = sweep.plan(sweep.load_sweep(tmp_path / "s.yaml"), Path("out"), [])
    assert [r.folder.name for r in runs] == ["none", "gate-64", "gate-128", "dyvte"]
    assert "--model.pruner.checkpoint=G" in runs[1].args and "--model.pruner.checkpoint=G" not in runs[0].args
    assert not any(a.startswith("--model.pruner.budget") for a in runs[3].args)
    spec["pruners"] = [{"gate": {"budget": [64]}}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"pruner gate has unknown keys \['budget'\]"):
        sweep.load_sweep(tmp_path / "s.yaml")
