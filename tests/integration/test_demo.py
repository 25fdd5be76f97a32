"""`make demo`'s script: runs validate per pruner and budget, tabulates, plots, never redoes a finished run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import demo  # noqa: E402


def test_demo_table_plot_and_restart(tmp_path, capsys):
    argv = ["--pruners", "fastv", "--budgets", "64", "--out", str(tmp_path / "runs"), "--questions", "6"]
    table = demo.demo(argv)
    assert "| none | - |" in table and "| fastv | 64 |" in table
    assert (tmp_path / "runs" / "summary.md").read_text() == table
    assert (tmp_path / "runs" / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    (result,) = (tmp_path / "runs" / "fastv-64").rglob("results.json")
    stamp = result.stat().st_mtime_ns
    assert demo.demo(argv) == table  # restart: same table from the finished runs
    assert result.stat().st_mtime_ns == stamp
