"""`make demo`'s script: runs validate per pruner and budget, tabulates, plots, never redoes a finished run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import demo  # noqa: E402


def test_the_default_demo_holds_the_seed_pruners_and_all_six_core_names():
    args = demo.parse([])
    assert args.pruners == ["random", "pool", "fastv", "tome"] and args.budgets == [64, 128, 192]
    assert args.core == ["mustdrop", "gprune", "ficoco-v", "ficoco-l", "ficoco-vl", "tokencarve"]
    assert demo.parse(["--core"]).core == []


def test_demo_table_plot_and_restart(tmp_path, capsys):
    argv = ["--pruners", "fastv", "--budgets", "64", "--core", "gprune", "--core-budgets", "32",
            "--out", str(tmp_path / "runs"), "--questions", "6"]  # fmt: skip
    table = demo.demo(argv)
    assert "| none | - |" in table and "| fastv | 64 |" in table and "| gprune | 32 |" in table
    assert (tmp_path / "runs" / "summary.md").read_text() == table
    assert (tmp_path / "runs" / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    (result,) = (tmp_path / "runs" / "fastv-64").rglob("results.json")
    stamp = result.stat().st_mtime_ns
    assert demo.demo(argv) == table  # restart: same table from the finished runs
    assert result.stat().st_mtime_ns == stamp
