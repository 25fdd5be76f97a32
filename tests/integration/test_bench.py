"""The speed benchmark runs end to end (at toy width) and its predicted speedups are consistent."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_speed  # noqa: E402


def test_bench_runs_and_predicts_from_flops(capsys):
    rows = bench_speed.main(["--width", "64", "--mlp", "96", "--heads", "4", "--layers", "3",
                             "--vision-width", "32", "--image-size", "112", "--budgets", "16", "32",
                             "--reps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "meas/pred" in out and "fastv" in out and "pool" in out
    by = {(r["pruner"], r["budget"]): r for r in rows}
    assert by[("none", "-")]["tokens"] == 64
    assert by[("fastv", 16)]["tokens"] == 16 and by[("pool", 32)]["tokens"] == 32
    # Fewer tokens, fewer predicted FLOPs; pool cuts before the LLM so it saves more than fastv.
    assert by[("fastv", 16)]["pred"] > by[("fastv", 32)]["pred"] > 1
    assert by[("pool", 16)]["pred"] > by[("fastv", 16)]["pred"]
