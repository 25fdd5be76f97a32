"""Distributed training presets: a 2-process DDP `vtprune fit` on the CPU ends with the same learned weights on
both ranks, and the DeepSpeed presets parse and build their strategy (DeepSpeed itself needs CUDA to run:
`make check-gpu`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TRAIN = CONFIGS / "experiment" / "train_dyvte.yaml"


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    """A small random LLaVA that speaks the shapes benchmark's words (576 visual tokens, narrow layers)."""
    from data.shapes_llava import build_shapes_llava, shapes_processor

    folder = tmp_path_factory.mktemp("shapes-llava")
    processor = shapes_processor()
    build_shapes_llava(processor, vision_layers=2, vision_width=32, vision_mlp=64, llm_width=64, llm_mlp=96,
                       llm_kv_heads=2).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class DumpLearned(pl.Callback):
    """Saves the learned pruner's weights of this rank at the start and the end of fit (test helper; the DDP
    run imports it from this file)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule, when: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.pruner.state_dict().items()}
        torch.save(state, self.folder / f"{when}-rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer, module, "start")

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer, module, "end")


def test_ddp_fit_on_two_cpu_processes_ends_with_identical_weights(shapes_model, tmp_path):
    """`vtprune fit` with the DDP preset on 2 CPU processes (gloo): each rank trains on its own shard, so equal
    routers at the end (and changed ones) show that the gradients were averaged."""
    override = {
        "trainer": {"max_steps": 2, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "test_distributed.DumpLearned",
                                   "init_args": {"folder": str(tmp_path)}}]},
        "model": {"init_args": {"model_name_or_path": str(shapes_model), "lr": 0.05}},
        "data": {"init_args": {"train_size": 8, "batch_size": 2, "fit_val_size": 2, "num_workers": 0}},
    }  # fmt: skip
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    command = [sys.executable, "-m", "lightning_modules.cli", "fit", "-c", str(TRAIN),
               "-c", str(CONFIGS / "trainer" / "ddp.yaml"), "-c", str(tmp_path / "override.yaml"),
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--ckpt_path=null"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    end = [torch.load(tmp_path / f"end-rank{rank}.pt") for rank in (0, 1)]
    start = torch.load(tmp_path / "start-rank0.pt")
    assert end[0].keys() == end[1].keys() == start.keys()
    assert all(torch.equal(end[0][k], end[1][k]) for k in end[0])
    assert any(not torch.equal(end[0][k], start[k]) for k in start)  # the routers did learn


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_presets_parse_and_build_their_strategy(capsys, stage):
    from pytorch_lightning.strategies import DeepSpeedStrategy

    from lightning_modules.cli import main

    preset = CONFIGS / "trainer" / f"deepspeed_zero{stage}.yaml"
    first_line = f"# vtprune fit -c configs/experiment/train_dyvte.yaml -c {preset.relative_to(ROOT)}"
    assert preset.read_text().startswith(first_line)
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(TRAIN), "-c", str(preset), "--print_config"])
    assert info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["accelerator"] == "cuda" and trainer["precision"] == "bf16-mixed" and trainer["devices"] == -1
    strategy = trainer["strategy"]
    module, name = strategy["class_path"].rsplit(".", 1)
    built = getattr(__import__(module, fromlist=[name]), name)(**strategy["init_args"])  # no CUDA needed to build
    assert isinstance(built, DeepSpeedStrategy)
    assert built.config["zero_optimization"]["stage"] == stage


def test_ddp_preset_looks_for_unused_parameters(capsys):
    """DyVTE trains one router per step: DDP must not wait for the others' gradients."""
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_modules.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "-c", str(TRAIN), "-c", str(CONFIGS / "trainer" / "ddp.yaml"), "--print_config"])
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    built = DDPStrategy(**strategy["init_args"])
    assert strategy["class_path"].endswith("DDPStrategy") and built._ddp_kwargs["find_unused_parameters"] is True
