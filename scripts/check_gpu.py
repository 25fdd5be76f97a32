"""`make check-gpu`: a few steps of `vtprune fit` with each distributed preset, where CUDA is present.

    python scripts/check_gpu.py                      # ddp, deepspeed_zero2, deepspeed_zero3 on every GPU
    python scripts/check_gpu.py --presets deepspeed_zero2 --devices 1
    python scripts/check_gpu.py --presets ddp --accelerator cpu --devices 2   # the DDP path on a CPU machine

DeepSpeed trains only on CUDA, so the test suite builds the DeepSpeed strategies but cannot run them; this
script does, on a small random LLaVA that speaks the shapes benchmark's words (written to a temporary folder):
`configs/experiment/train_dyvte.yaml` + the preset, `--steps` steps of a `--steps` + 1 step run with a checkpoint
at each and validations (the pruned runtime under the preset), interrupted; then the resume from the last
checkpoint for the step left. It prints
for each preset what happened (exit code, steps, last loss, whether the routers learned, seconds) and the tail
of the log of a run that failed. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "experiment" / "train_dyvte.yaml"
PRESETS = ("ddp", "deepspeed_zero2", "deepspeed_zero3")


def write_model(folder: Path) -> Path:
    """A small random shapes LLaVA (576 visual tokens, 4 LLM layers of width 64) with its processor."""
    sys.path.insert(0, str(ROOT))
    from data.shapes_llava import build_shapes_llava, shapes_processor

    processor = shapes_processor()
    model = build_shapes_llava(processor, vision_layers=2, vision_width=32, vision_mlp=64, llm_width=64,
                               llm_mlp=96, llm_kv_heads=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def override(run: Path, model: Path, stop: int | None) -> Path:
    """The small run's settings: data, logger and checkpoints under `run`, a lively learning rate; with `stop`,
    an interruption after that many steps."""
    config = {
        "trainer": {
            "val_check_interval": 2, "limit_val_batches": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0,
                                         "every_n_train_steps": 1}}],
        },
        "model": {"init_args": {"model_name_or_path": str(model), "lr": 0.01}},
        "data": {"init_args": {"train_size": 64, "batch_size": 2, "fit_val_size": 4, "num_workers": 0}},
    }  # fmt: skip
    if stop is not None:
        stopper = {"class_path": "lightning_modules.training_utils.StopAfter", "init_args": {"steps": stop}}
        config["trainer"]["callbacks"].append(stopper)
    path = run / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(preset: str, run: Path, model: Path, steps: int, stop: int | None, accelerator: str | None,
        devices: str) -> tuple[int, str]:
    """Runs `vtprune fit` for `steps` steps, interrupted after `stop` (a fresh process: DeepSpeed and DDP set up
    process groups); (exit code, output)."""
    command = [sys.executable, "-m", "lightning_modules.cli", "fit", "-c", str(TRAIN),
               "-c", str(ROOT / "configs" / "trainer" / f"{preset}.yaml"), "-c", str(override(run, model, stop)),
               f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={run}", f"--trainer.devices={devices}"]
    if accelerator:
        command.append(f"--trainer.accelerator={accelerator}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def metrics(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.rglob("metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def router_weights(run: Path) -> dict | None:
    """The routers of the last checkpoint (a file, or DeepSpeed's folder with its model states); None where they
    cannot be read there (ZeRO-3 keeps the sharded weights in its optimizer files)."""
    last = run / "checkpoints" / "last.ckpt"
    files = [last] if last.is_file() else sorted(last.rglob("*model_states.pt"))
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        weights = state.get("state_dict") or state.get("module") or {}
        routers = {k: v for k, v in weights.items() if "pruner." in k}
        if routers and all(v.numel() for v in routers.values()):
            return routers
    return None


def check(preset: str, work: Path, model: Path, steps: int, accelerator: str | None, devices: str) -> bool:
    run = work / preset
    run.mkdir()
    start = time.perf_counter()
    code, output = fit(preset, run, model, steps + 1, steps, accelerator, devices)  # interrupted after `steps`
    first = router_weights(run) if code == 0 else None
    if code == 0:  # resume: `ckpt_path: last` must continue from the checkpoint for the one step left
        code, more = fit(preset, run, model, steps + 1, None, accelerator, devices)
        output += more
    seconds = time.perf_counter() - start
    rows = metrics(run)
    losses = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/prefill_flops_ratio")]
    last = router_weights(run) if code == 0 else None
    learned = "n/a" if first is None or last is None else any(not torch.equal(first[k], last[k]) for k in first)
    print(f"{preset:16s} exit {code}  steps logged {[s for s, _ in losses]}  last loss "
          f"{losses[-1][1] if losses else None}  validations {len(val)}  routers learned on resume {learned}  "
          f"{seconds:.0f} s")
    if code != 0:
        print("\n".join(output.splitlines()[-40:]))
    return code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--steps", type=int, default=3, help="steps of the first run (the resume adds one)")
    parser.add_argument("--devices", default="-1", help="--trainer.devices (default: every GPU)")
    parser.add_argument("--accelerator", default=None, help="override the preset's accelerator (cpu: DDP only)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and (args.accelerator != "cpu" or any(p.startswith("deepspeed") for p in args.presets)):
        print("check-gpu: CUDA is not available here, so the DeepSpeed presets (CUDA only) were not run; "
              "nothing to check. (`--presets ddp --accelerator cpu --devices 2` runs the DDP preset on the CPU.)")
        return 0
    if cuda:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"check-gpu: CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {names}")
    with tempfile.TemporaryDirectory(prefix="vtprune-check-gpu-") as work:
        model = write_model(Path(work) / "model")
        ok = [check(p, Path(work), model, args.steps, args.accelerator, args.devices) for p in args.presets]
    print("check-gpu: " + ("every preset ran" if all(ok) else "FAILED: " + ", ".join(
        p for p, good in zip(args.presets, ok) if not good)))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
