"""Stage 1 of the tiny LLaVA: the CLIP tower learns on its own, through its CLS token.

LLaVA starts from a CLIP tower whose CLS token was trained (contrastively) to describe the whole
image, so the CLS row of attention points at what matters; VisionZip, PruMerge, MustDrop and FiCoCo
read that row. Our tower has no CLIP to start from, so it learns the same way on the shapes scenes:
heads on the pooled CLS output (after the last layer and `post_layernorm`, as CLIP's projection)
predict what the scene holds (`data.shapes_targets.HEADS`). LLaVA-1.5 feeds the LLM from layer -2,
so the last layer only serves this objective, as in CLIP.

Deviation: the patch tokens of layer -2 also get dense heads (`PATCH_HEADS`: what covers each
patch, which label character, whether an object's centre lies in it). CLIP's patch tokens come
from hundreds of millions of images; with the CLS objective alone our tower, after 600 steps
(20,000 scenes, a third of the CPU budget), still counted shapes and read labels at the level of
always answering the most common class. The dense signal gives the frozen tower's tokens what
stage 2 needs, while the CLS objective keeps CLS attention meaningful.

The whole (untrained-decoder) LLaVA is exported at the end, with its processor, for stage 2
(`lightning_modules.qa_finetuning`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from data.shapes_llava import build_shapes_llava, shapes_processor
from data.shapes_targets import HEADS, PATCH_HEADS

from .training_utils import adamw_cosine, export


class VisionPretraining(pl.LightningModule):
    """CLS pre-training of the tiny LLaVA's vision tower on the shapes scenes.

    Args:
        output_dir: where the LLaVA folder (trained tower, fresh projector and decoder) is written.
        lr, weight_decay, warmup_steps: AdamW with linear warmup then cosine decay to 0 at
            the trainer's `max_steps`.
        seed: initialisation seed of the whole model.
    """

    def __init__(
        self,
        output_dir: str = "runs/train_tiny_llava/vision/model",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.processor = shapes_processor()
        self.llava = build_shapes_llava(self.processor, seed=seed).train()
        width = self.llava.config.vision_config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(width, n * k) for name, (n, k, _) in HEADS.items()})
        self.patch_norm = nn.LayerNorm(width)
        self.patch_heads = nn.ModuleDict({name: nn.Linear(width, k) for name, k in PATCH_HEADS.items()})

    @property
    def tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    def pixels(self, images: list) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    def outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled CLS output, normalised patch tokens of layer -2: the tokens LLaVA feeds the LLM)."""
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.pooler_output, self.patch_norm(out.hidden_states[-2][:, 1:])

    def losses(self, pixel_values: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One loss per head: mean BCE for multi-label heads, mean cross-entropy for the others."""
        return self.head_losses(*self.outputs(pixel_values), targets)

    def head_losses(
        self, cls: torch.Tensor, patches: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`losses` from the tower's outputs (see `outputs`)."""
        out = {}
        for name, k in PATCH_HEADS.items():
            out[name] = self.patch_loss(name, self.patch_heads[name](patches).reshape(-1, k), targets[name].reshape(-1))
        for name, (n, k, kind) in HEADS.items():
            logits = self.heads[name](cls).view(-1, n, k)
            if kind == "bce":
                out[name] = F.binary_cross_entropy_with_logits(logits, targets[name])
            else:
                out[name] = F.cross_entropy(logits.reshape(-1, k), targets[name].reshape(-1))
        return out

    def patch_loss(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of one patch head. Shape and character are scored on the patches that hold
        something only: nine patches in ten are background, and averaged over all of them the loss
        of "which shape / which character" was too faint to learn within the CPU budget."""
        if name == "patch_center":  # object centres are 1 patch in 100: weigh them up
            return F.cross_entropy(logits, target, torch.tensor([1.0, 10.0], device=logits.device))
        if name in ("patch_shape", "patch_char", "patch_code"):
            held = target > 0
            return F.cross_entropy(logits[held], target[held]) if held.any() else logits.sum() * 0
        return F.cross_entropy(logits, target)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(self.pixels(batch["image"]), batch["targets"])
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        targets = batch["targets"]
        cls, patches = self.outputs(self.pixels(batch["image"]))
        losses = self.head_losses(cls, patches, targets)
        n = len(batch["image"])
        self.log("val/loss", sum(losses.values()), prog_bar=True, batch_size=n)
        for name in ("text", "color_count", "shape_count"):  # exact-answer heads: accuracy reads easily
            heads, k, _ = HEADS[name]
            predicted = self.heads[name](cls).view(-1, heads, k).argmax(-1)
            accuracy = (predicted == targets[name]).float().mean()
            self.log(f"val/{name}_accuracy", accuracy, prog_bar=name == "text", batch_size=n)
        for name in PATCH_HEADS:  # accuracy on the patches that hold something (class > 0)
            predicted, target = self.patch_heads[name](patches).argmax(-1), targets[name]
            held = target > 0 if name not in ("patch_row", "patch_col") else torch.ones_like(target, dtype=torch.bool)
            accuracy = (predicted == target)[held].float().mean()
            self.log(f"val/{name}_accuracy", accuracy, batch_size=n)

    def configure_optimizers(self) -> dict:
        modules = (self.tower, self.heads, self.patch_norm, self.patch_heads)  # not the LLM: stage 2's
        params = [p for module in modules for p in module.parameters()]
        hp = self.hparams
        return adamw_cosine(params, hp.lr, hp.weight_decay, hp.warmup_steps, self.trainer.max_steps)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            print(f"exported: {export(self.llava, self.processor, self.hparams.output_dir)}")
