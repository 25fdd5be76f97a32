"""Pieces shared by the training modules: the optimizer with warmup and cosine decay, and export."""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

UNSET_TOTAL = 10_000  # decay horizon when the trainer has no max_steps (-1)


def adamw_cosine(params: list[nn.Parameter], lr: float, weight_decay: float, warmup: int, max_steps: int) -> dict:
    """AdamW with linear warmup over `warmup` steps and cosine decay to 0 at the trainer's
    `max_steps` (UNSET_TOTAL when unset), for `configure_optimizers`. Weight decay skips biases and
    norms (every parameter under 2-D)."""
    total = max_steps if max_steps > 0 else UNSET_TOTAL
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def export(model, processor, folder: str | Path) -> Path:
    """`save_pretrained` model (safetensors) and processor into `folder`, as a hub-ready folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


class StopAfter(pl.Callback):
    """Ends fit after `steps` optimizer steps, as an interruption would (the schedule keeps its length):
    how the resume checks (tests, `make check-gpu`) interrupt a run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
