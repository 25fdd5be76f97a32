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


def test_bench_runs_on_a_llava_next_shape(capsys):
    """--family llava-next: a 2 x 2-crop image (5 views of 16 tokens at this toy tile), budgets per whole image."""
    rows = bench_speed.main(["--family", "llava-next", "--width", "64", "--mlp", "96", "--heads", "4", "--layers", "3",
                             "--vision-width", "32", "--vision-layers", "3", "--image-size", "56",
                             "--pruners", "fastv", "visionzip", "gprune", "mustdrop", "--budgets", "16", "32",
                             "--reps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "llava-next prefill" in out and "meas/pred" in out
    by = {(r["pruner"], r["budget"]): r for r in rows}
    assert by[("none", "-")]["tokens"] == 80
    for name in ("fastv", "visionzip", "gprune", "mustdrop"):
        assert by[(name, 16)]["tokens"] == 16 and by[(name, 32)]["tokens"] == 32
        assert by[(name, 16)]["pred"] > by[(name, 32)]["pred"] > 1
    # Cutting before the LLM (gprune, visionzip) saves more than cutting after LLM layer 1 (fastv).
    assert by[("gprune", 16)]["pred"] > by[("fastv", 16)]["pred"]
