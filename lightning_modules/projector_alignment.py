"""Stage 2b of the tiny LLaVA: the projector learns to write the grounded tokens from the tower.

As LLaVA's first stage (feature alignment: only the projector trains, tower and decoder frozen),
with a denser signal than captions: for every patch of every scene, the projector's output on the
frozen stage-1 tower's features (layer -2, CLS dropped, as the model feeds the LLM) regresses onto
the grounded token the stage-2a decoder learnt to answer from (`lightning_modules.grounding`). A
step costs one tower forward and no decoder pass. Validation scores the questions through the
whole model, as stage 2c and `vtprune validate` do.

The loss is the mean squared error over object and label patches plus that over background
patches: nine patches in ten are background, and a plain mean would spend the projector on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grounding import GroundingWords, grounded_tokens, object_patches
from .hf_model import load_model_and_processor
from .qa_finetuning import QAFinetuning


class ProjectorAlignment(QAFinetuning):
    """Projector training on the grounded tokens; tower (from `vision_from`) and decoder frozen.

    Args:
        model_name_or_path: the stage-2a folder (the decoder trained on grounded tokens).
        vision_from: the stage-1 folder, whose trained tower replaces the one in `model_name_or_path`.
        output_dir: where the LLaVA folder is written (stage 2c starts from it).
        lr, weight_decay, warmup_steps, prompt: as `QAFinetuning`.
    """

    def __init__(
        self,
        model_name_or_path: str = "runs/train_tiny_llava/grounded/model",
        vision_from: str = "runs/train_tiny_llava/vision/model",
        output_dir: str = "runs/train_tiny_llava/align/model",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        prompt: str = "{question}",
    ) -> None:
        super().__init__(model_name_or_path, output_dir, lr, weight_decay, warmup_steps, prompt)
        self.save_hyperparameters()
        vision, processor = load_model_and_processor(vision_from)
        if processor.tokenizer.get_vocab() != self.processor.tokenizer.get_vocab():
            raise ValueError(
                f"{vision_from} and {model_name_or_path} have different tokenizers: not stages of one model"
            )
        self.llava.model.vision_tower.load_state_dict(vision.model.vision_tower.state_dict())
        self.llava.requires_grad_(False)
        self.llava.model.multi_modal_projector.requires_grad_(True)
        self.words = GroundingWords(self.processor.tokenizer)

    def projected(self, images: list) -> Tensor:
        """(B, 576, D) projector outputs on `images`, by the model's own feature path (layer -2, CLS
        dropped); only the projector has gradients, so no graph is kept through the tower."""
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)
        return torch.stack(self.llava.model.get_image_features(pixel_values=pixels).pooler_output)

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(the loss, the squared error relative to the goal's mean square: 0 exact, 1 as far as zeros)."""
        self.llava.eval()  # frozen parts: no dropout
        targets = {k: v.to(self.device) for k, v in batch["targets"].items()}
        goal = grounded_tokens(targets, self.llava.get_input_embeddings().weight, self.words)
        error = (self.projected(batch["image"]) - goal).pow(2).mean(-1)
        held = object_patches(targets)
        return error[held].mean() + error[~held].mean(), error.mean() / goal.pow(2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, relative = self.loss(batch)
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/relative_error", relative, batch_size=n)
        return loss
