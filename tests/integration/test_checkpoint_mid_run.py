"""The learned pruners' shipped configs write last.ckpt after every validation, not only when fit ends, so a run
killed mid-way (not stopped politely) resumes from its last validated state. Lightning 2.6's ModelCheckpoint
writes last.ckpt on validation end only when it also saved a top-k file, so `save_top_k: 0` lost everything."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import write_shapes_model

import pruners
from lightning_modules.learned_training import LearnedPrunerTraining
from lightning_modules.shapes_data import ShapesBenchmark

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["train_gate.yaml", "train_dyvte.yaml"]


def checkpoint_args(config: str) -> dict:
    """The ModelCheckpoint init_args of a shipped experiment config."""
    text = (ROOT / "configs" / "experiment" / config).read_text()
    callbacks = yaml.safe_load(text)["trainer"]["callbacks"]
    return next(c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))


class Witness(pl.Callback):
    """Before each training step, the global step stored in last.ckpt (None while there is none)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer, *args) -> None:
        last = self.folder / "last.ckpt"
        step = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
        self.seen.append(step)


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    return write_shapes_model(tmp_path_factory.mktemp("shapes-llava"))


@pytest.mark.parametrize("config", CONFIGS)
def test_last_checkpoint_is_written_after_each_validation(config, shapes_model, tmp_path):
    args = {**checkpoint_args(config), "dirpath": str(tmp_path / "checkpoints")}
    witness = Witness(tmp_path / "checkpoints")
    module = LearnedPrunerTraining(pruners.build("gate", hidden=8), model_name_or_path=str(shapes_model),
                                   budgets=[32], lr=0.01, warmup_steps=1)  # fmt: skip
    callbacks = [pl.callbacks.ModelCheckpoint(**args), witness]
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=ShapesBenchmark(train_size=8, batch_size=2, fit_val_size=2, targets=False))
    # steps 0 and 1 before any validation; after the validation at step 2, a kill would resume from step 2
    assert witness.seen == [None, None, 2, 2]
