"""Stage 2a of the tiny LLaVA: the decoder learns the questions on grounded visual tokens.

LLaVA's decoder (Vicuna) could read and answer before it ever saw an image; instruction tuning then
only had to bring the image to it. Ours starts from random weights. Here it learns the six question
families on sequences laid out exactly as the model's prompts, with the 576 image tokens replaced by
the grounded tokens of the scene (`lightning_modules.grounding`: each patch the sum of the embeddings
of the words that describe it). An earlier stage that told the scene as a sentence taught colour and
shape but not where things are or how many; on grounded tokens at their image positions the decoder
learnt colour and shape in 300 steps.

Speed: most of the 576 tokens are background. Each training batch keeps every object and label
token and a random share of the background (uniform in [0, 1/4] per batch), at their own positions
(`turn_packing.drop_tokens`), so a step costs a fifth of a full one (sequences of ~220 tokens, not
~680). Validation keeps all 576, and stage 2c trains at full length.

Tower and projector are untouched; `projector_alignment` (stage 2b) then teaches the projector to
write these tokens from the tower's features.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from data.shapes_llava import build_shapes_llava, shapes_processor

from .grounding import GroundingWords, grounded_tokens, object_patches
from .qa_finetuning import QAFinetuning
from .turn_packing import drop_tokens


class GroundedPretraining(QAFinetuning):
    """Decoder training on grounded visual tokens (`ShapesBenchmark(targets=True, images=False)`).

    Args:
        model_name_or_path: the folder to start from; None builds the untrained shapes LLaVA
            (`data.shapes_llava`) with `seed`: this stage reads neither tower nor projector.
        output_dir: where the LLaVA folder is written (stage 2b starts from it).
        lr, weight_decay, warmup_steps, prompt: as `QAFinetuning`.
        noise: Gaussian noise added to every grounded token, as a fraction of the embeddings' RMS,
            so the decoder does not rely on exact sums the projector will only approximate.
        background: the largest share of background tokens a training batch keeps (the share is
            uniform in [0, background] per batch); validation keeps all.
        seed: initialisation seed when `model_name_or_path` is None.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        output_dir: str = "runs/train_tiny_llava/grounded/model",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        prompt: str = "{question}",
        noise: float = 0.1,
        background: float = 0.25,
        seed: int = 0,
    ) -> None:
        self.seed = seed
        super().__init__(model_name_or_path, output_dir, lr, weight_decay, warmup_steps, prompt)
        self.save_hyperparameters()
        self.llava.model.multi_modal_projector.requires_grad_(False)
        self.words = GroundingWords(self.processor.tokenizer)

    def load_model(self, path: str | None) -> tuple:
        if path is not None:
            return super().load_model(path)
        processor = shapes_processor()
        return build_shapes_llava(processor, seed=self.seed), processor

    def encode(self, batch: dict, texts: list[str]) -> dict:
        """The chat texts tokenized with `<image>` expanded to one token per patch, as the processor
        expands it; no image is read (`sequences` puts the grounded tokens there)."""
        image = self.processor.image_token
        patches = batch["targets"]["patch_color"].shape[1]
        texts = [text.replace(image, image * patches, 1) for text in texts]
        return self.processor.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)

    def sequences(self, batch: dict, turns: list, drop: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(inputs_embeds, 4-D mask, position ids, labels) of conversations `turns` about the batch's
        scenes (packed by `training_inputs`), the image tokens grounded; with `drop`, a random share of
        background tokens dropped. Labels are -100 except where the next token is an answer or its `</s>`."""
        inputs = self.training_inputs({**batch, "turns": turns})
        ids = inputs["input_ids"]
        labels = torch.full_like(ids, -100)
        answer = self.answer_mask(ids)[:, 1:]
        labels[:, :-1][answer] = ids[:, 1:][answer]
        targets = {k: v.to(self.device) for k, v in batch["targets"].items()}
        embedding = self.llava.get_input_embeddings()
        tokens = grounded_tokens(targets, embedding.weight, self.words)
        if drop and self.hparams.noise > 0:
            rms = embedding.weight.detach().pow(2).mean().sqrt()
            tokens = tokens + self.hparams.noise * rms * torch.randn_like(tokens)
        is_image = ids == self.llava.config.image_token_id
        embeds = embedding(ids).masked_scatter(is_image[..., None], tokens)
        keep = torch.ones_like(is_image)
        if drop:
            share = self.hparams.background * torch.rand(())  # of the background kept in this batch
            dropped = ~object_patches(targets) & (torch.rand(targets["patch_color"].shape, device=self.device) >= share)
            keep[is_image] = ~dropped.flatten()
        mask, positions = inputs["attention_mask"], inputs["position_ids"]
        mask, positions, embeds, labels = drop_tokens(keep, mask, positions, embeds, labels)
        return embeds, mask, positions, labels

    def logits(self, embeds: Tensor, mask: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        """Next-token logits at the labelled positions only (the head is the costly part)."""
        hidden = self.llava.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return self.llava.lm_head(hidden.last_hidden_state[labels != -100])

    def loss(self, batch: dict) -> tuple[Tensor, int]:
        """(answers-only cross-entropy of the batch's conversations, background dropped; tokens a row)."""
        turns = batch.get("turns") or [[qa] for qa in zip(batch["question"], batch["answer"])]
        embeds, mask, positions, labels = self.sequences(batch, turns, drop=True)
        return F.cross_entropy(self.logits(embeds, mask, positions, labels), labels[labels != -100]), embeds.shape[1]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, length = self.loss(batch)
        n = len(batch["targets"]["patch_color"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/tokens", float(length), batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        turns = [[qa] for qa in zip(batch["question"], batch["answer"])]
        logits = self.logits(*self.sequences(batch, turns, drop=False))
        next_token = logits[::2].argmax(-1)  # each row labels its answer, then its </s>
        answers = self.processor.tokenizer.batch_decode(next_token[:, None], skip_special_tokens=True)
        self.metric.update(answers, batch)
