"""Stage 2 of the tiny LLaVA: the vision tower frozen, projector and decoder learn to answer.

As LLaVA's instruction tuning: the CLIP tower from stage 1 (`lightning_modules.vision_pretraining`)
is frozen; the projector and the whole decoder train on (image, question, answer) in the model's
chat format, with the loss on the answers and the end-of-sequence tokens only. A training sample is
a conversation of one or more turns about one image (`ShapesBenchmark(turns=...)`, as LLaVA's
multi-turn instruction data), so the 576 visual tokens are paid for once per several answers; the
turns are packed blind to each other (`lightning_modules.turn_packing`), so none can copy an
answer from another and each reads exactly like an evaluation prompt. Every
answer of the shapes benchmark is one word: the targets are the token after each "ASSISTANT:" and
the `</s>` after it.

Validation scores the greedy first token, which is the answer the model generates (its next token
is `</s>`), overall and per family, and exports the model so an interrupted run leaves its best.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from .hf_model import chat_prompt, load_model_and_processor
from .metrics import VQAAccuracy, metric_for
from .training_utils import adamw_cosine, export
from .turn_packing import isolated_turns


class QAFinetuning(pl.LightningModule):
    """Projector + decoder training on the shapes questions, vision tower frozen.

    Args:
        model_name_or_path: the stage-1 folder (LLaVA with a trained tower).
        output_dir: where the trained LLaVA folder is written (the shipped checkpoint).
        lr, weight_decay, warmup_steps: AdamW, linear warmup, cosine decay to 0 at `max_steps`.
        prompt: question template; `{question}` is replaced by the question (as `PrunedMLLM`).
    """

    def __init__(
        self,
        model_name_or_path: str = "runs/train_tiny_llava/vision/model",
        output_dir: str = "checkpoints/tiny-llava-shapes",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        prompt: str = "{question}",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.llava, self.processor = self.load_model(model_name_or_path)
        self.llava.train().model.vision_tower.requires_grad_(False)
        self.metric = VQAAccuracy()

    def load_model(self, path: str | None) -> tuple:
        """(LLaVA, processor) this stage starts from: the folder the previous stage wrote."""
        return load_model_and_processor(path)

    def setup(self, stage: str) -> None:
        self.metric = metric_for(self.trainer.datamodule)

    def prompts(self, questions: list[str]) -> list[str]:
        """The chat-formatted prompts, as `PrunedMLLM.build_prompt` writes them."""
        return [chat_prompt(self.processor, self.hparams.prompt.format(question=q)) for q in questions]

    def inputs(self, images: list, texts: list[str]) -> dict:
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)

    def encode(self, batch: dict, texts: list[str]) -> dict:
        """Model inputs for the batch's images and one chat text each."""
        return self.inputs(batch["image"], texts)

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, list[str]]:
        """(prefix, turn texts) of a conversation: the prefix is the prompt up to and with the image;
        each turn is the rest of that question's single-turn prompt, then its answer and `</s>`, so
        that under `isolated_turns` every turn reads exactly like the prompt of an evaluation."""
        image = self.processor.image_token + "\n"
        eos = self.processor.tokenizer.eos_token
        texts = []
        for question, answer in turns:
            prefix, rest = self.prompts([question])[0].split(image, 1)
            texts.append(f"{rest} {answer}{eos}")
        return prefix + image, texts

    def training_inputs(self, batch: dict) -> dict:
        """Model inputs of a training batch: each conversation packed as prefix + turns, the turns
        blind to each other (`lightning_modules.turn_packing`)."""
        turns = batch.get("turns") or [[qa] for qa in zip(batch["question"], batch["answer"])]
        prefixes, texts = zip(*(self.conversation(t) for t in turns))
        inputs = self.encode(batch, [p + "".join(t) for p, t in zip(prefixes, texts)])
        tokenizer = self.processor.tokenizer
        lengths = [[len(ids) for ids in tokenizer(list(t), add_special_tokens=False)["input_ids"]] for t in texts]
        mask, positions = isolated_turns(inputs["attention_mask"].cpu(), lengths)
        return {**inputs, "attention_mask": mask.to(self.device), "position_ids": positions.to(self.device)}

    def answer_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True at the tokens the loss is on: each answer (the token after "assistant" ":") and its `</s>`."""
        assistant, colon = self.processor.tokenizer.convert_tokens_to_ids(["assistant", ":"])
        answer = torch.zeros_like(input_ids, dtype=torch.bool)
        answer[:, 2:] = (input_ids[:, :-2] == assistant) & (input_ids[:, 1:-1] == colon)
        mask = answer.clone()
        mask[:, 1:] |= answer[:, :-1]
        return mask

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.llava.model.vision_tower.eval()  # frozen: no dropout, whatever mode Lightning set
        inputs = self.training_inputs(batch)
        ids = inputs["input_ids"]
        mask = self.answer_mask(ids)[:, 1:]  # position t predicts token t + 1
        targets = ids[:, 1:][mask]
        if (targets == self.processor.tokenizer.unk_token_id).any():
            raise ValueError(f"an answer is not one known word: {batch.get('turns') or batch['answer']}")
        logits = self.llava(**inputs).logits[:, :-1][mask]
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs = self.encode(batch, self.prompts(batch["question"]))
        next_token = self.llava(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        answers = self.processor.tokenizer.batch_decode(next_token[:, None], skip_special_tokens=True)
        self.metric.update(answers, batch)

    def on_validation_epoch_end(self) -> None:
        scores = self.metric.compute()
        logged = {"val/accuracy": scores["accuracy"]}
        logged.update({f"val/{task}": acc for task, acc in scores["accuracy_by_task"].items()})
        self.log_dict(logged, prog_bar=False)
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            export(self.llava, self.processor, self.hparams.output_dir)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.llava.parameters() if p.requires_grad]
        hp = self.hparams
        return adamw_cosine(params, hp.lr, hp.weight_decay, hp.warmup_steps, self.trainer.max_steps)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            print(f"exported: {export(self.llava, self.processor, self.hparams.output_dir)}")
