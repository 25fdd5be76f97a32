"""`DyVTETraining`: DyVTE's exit routers learned against a frozen MLLM (METHODS.md §5.3).

    vtprune fit -c configs/experiment/train_dyvte.yaml

Each step samples one exit layer k for the whole batch (`pruners.learned.dyvte.sample_layer`: from the seed and
the step, so DDP ranks agree and a resumed run continues the same sequence), runs the batch of (image, question,
answer) twice, normally (A) and with every visual token withdrawn after layer k (B), labels each sample 1 when B
still answers as A does (argmax agreement on > 99% of the answer tokens and CE_B < 1.03 CE_A) and trains router
k alone on those labels with cross-entropy (`pruners.learned.dyvte.exit_step`). The MLLM is frozen and gets no
LoRA; only the routers of the `dyvte` pruner train. Training data: single-turn questions
(`ShapesBenchmark(turns=1)`), as the paper's single-turn subset of mix665k.

Recipe (official `finetune_visual_gate.sh`) as defaults: AdamW, lr 6e-5, cosine decay, 3% linear warm-up, weight
decay 0, one epoch. Its batch (16 x 8 GPUs), bf16 and 13B base model are the user's: the trainer presets
(`configs/trainer/`) and the data's batch size set them.

Built on `LearnedPrunerTraining` (lightning_modules/learned_training.py): its configuration checks before any
work, inputs, progress bar (loss, samples/s), validation that answers each question greedily with the pruner
attached exactly as `vtprune validate` does, and checkpoints that hold only the routers plus what
scripts/publish_checkpoint.py needs. Logged (torchmetrics): train/loss, train/samples_per_s,
train/router_accuracy (router argmax against the label), train/exit_label_rate (share labelled "exit");
val/accuracy (DyVTE's routers deciding at `threshold`), val/accuracy_none (the unpruned model on the same
questions), val/prefill_flops_ratio (DyVTE / none, the efficiency report's count), val/visual_tokens_layer_mean,
and val/router_accuracy, val/exit_label_rate over every layer where an exit acts (0..L-2).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

import pruners
from pruners import Pruner
from pruners.learned.dyvte import AGREEMENT, CE_RATIO, DyVTE, exit_step, sample_layer

from .learned_training import LearnedCheckpointing, LearnedPrunerTraining
from .metrics import metric_for
from .training_utils import adamw_cosine

PAPER_LR = 6e-5
PAPER_WARMUP = 0.03  # share of the steps
PAPER_WEIGHT_DECAY = 0.0


class DyVTETraining(LearnedPrunerTraining):
    """Trains a `dyvte` pruner's routers on a frozen MLLM.

    Args:
        pruner: the `dyvte` pruner (`--model.init_args.pruner.init_args.threshold=...`); None: `dyvte` with its
            defaults. May start from a checkpoint folder (`checkpoint=`).
        model_name_or_path: local Hugging Face folder of the MLLM (LLaVA-1.5 family).
        lr, weight_decay, warmup_ratio: AdamW with linear warm-up over that share of the steps and cosine decay
            to 0 at the last step (paper: 6e-5, 0, 0.03).
        max_new_tokens, prompt, dtype, attn_implementation: as `LearnedPrunerTraining` (and `PrunedMLLM`).
        seed: seeds the per-step exit layer.
        label_ce_ratio, label_ce_margin: the label's cross-entropy bound CE_B < ratio CE_A + margin (paper: 1.03
            and no margin; `pruners.learned.dyvte.exit_labels` says why a small model needs a margin).
    """

    def __init__(
        self,
        pruner: Pruner | None = None,
        model_name_or_path: str = "checkpoints/tiny-llava-shapes",
        lr: float = PAPER_LR,
        weight_decay: float = PAPER_WEIGHT_DECAY,
        warmup_ratio: float = PAPER_WARMUP,
        max_new_tokens: int = 8,
        prompt: str = "{question}",
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        label_ce_ratio: float = CE_RATIO,
        label_ce_margin: float = 0.0,
    ) -> None:
        pruner = pruners.build("dyvte") if pruner is None else pruner
        if not isinstance(pruner, DyVTE):
            raise ValueError(f"DyVTETraining trains a dyvte pruner, got {pruner.name!r}; other learned pruners "
                             "train with LearnedPrunerTraining (configs/experiment/train_gate.yaml)")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        if not label_ce_ratio >= 1 or not label_ce_margin >= 0:
            raise ValueError(f"label_ce_ratio must be >= 1 and label_ce_margin >= 0 (paper: 1.03 and 0), got "
                             f"{label_ce_ratio!r} and {label_ce_margin!r}")
        self.label_bound = {"ce_ratio": float(label_ce_ratio), "ce_margin": float(label_ce_margin)}
        # No budgets (DyVTE is adaptive), no LoRA (the paper trains the routers alone); the warm-up is a share of
        # the steps (`configure_optimizers`), not the parent's step count.
        super().__init__(pruner, model_name_or_path, budgets=None, lora_rank=0, lr=lr, weight_decay=weight_decay,
                         warmup_steps=0, max_new_tokens=max_new_tokens, prompt=prompt, seed=seed, dtype=dtype,
                         attn_implementation=attn_implementation)  # fmt: skip
        self.image_token_id = self.llava.config.image_token_id
        self.train_router_accuracy, self.train_exit_rate = BinaryAccuracy(), MeanMetric()
        self.val_router_accuracy, self.val_exit_rate = BinaryAccuracy(), MeanMetric()
        self.val_flops_ratio, self.val_layer_mean = MeanMetric(), MeanMetric()
        self.val_none = metric_for(None)
        self._report: dict | None = None

    def training_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Left-padded inputs of prompt + " answer" + end token, and each row's answer length in tokens."""
        answer, mask = self.answer_tokens(batch["answer"])
        prompt = self.prompt_inputs(batch["image"], batch["question"])
        lengths = mask.sum(-1)
        # Append each answer right after its own prompt: prompts are left-padded, so the rows stay aligned at
        # their ends and each answer's padding (right of it) moves to the left of the row.
        ids = torch.cat([prompt["input_ids"], answer], 1)
        valid = torch.cat([prompt["attention_mask"].bool(), mask], 1)
        order = torch.sort(valid.long(), dim=1, stable=True).indices  # padding first, real tokens in order
        inputs = {**prompt, "input_ids": ids.gather(1, order),
                  "attention_mask": valid.gather(1, order).long()}  # fmt: skip
        return inputs, lengths

    # ----- training -----

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs, lengths = self.training_inputs(batch)
        layer = sample_layer(self.pruner.layers, self.hparams.seed, self.global_step)
        logits, labels = exit_step(self.llava, self.pruner, inputs, lengths, layer, self.image_token_id,
                                       **self.label_bound)
        loss = F.cross_entropy(logits.float(), labels)  # class weights [1, 1] (official)
        size = len(labels)
        self.train_loss(loss.detach())
        self.train_router_accuracy(logits.detach().argmax(-1), labels)
        self.train_exit_rate(labels.float())
        self.log("train/loss", self.train_loss, prog_bar=True, batch_size=size)
        self.log("train/router_accuracy", self.train_router_accuracy, batch_size=size)
        self.log("train/exit_label_rate", self.train_exit_rate, batch_size=size)
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(hp.warmup_ratio * total)
        return adamw_cosine(self.trainable_parameters(), hp.lr, hp.weight_decay, warmup, total)

    # ----- validation -----

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.val_none = metric_for(self.trainer.datamodule).to(self.device)

    def generate(self, batch: dict, pruner: Pruner) -> list[str]:
        """Greedy answers with `pruner` attached, as `PrunedMLLM.answer`; keeps the efficiency report."""
        inputs = self.prompt_inputs(batch["image"], batch["question"])
        with pruners.attach(self.llava, pruner) as report:
            output = self.llava.generate(**inputs, max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        self._report = report.as_dict()
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def answer(self, batch: dict, budget: int | None) -> list[str]:
        return self.generate(batch, self.pruner)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_none.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # DyVTE's answers, scored as vtprune validate scores them
        pruned, size = self._report, len(batch["question"])
        self.val_none.update(self.generate(batch, pruners.build("none")), batch)
        self.val_flops_ratio.update(pruned["prefill_flops"] / self._report["prefill_flops"], size)
        self.val_layer_mean.update(pruned["visual_tokens_layer_mean"], size)
        # The routers against the labels of every layer where an exit acts.
        inputs, lengths = self.training_inputs(batch)
        for layer in self.pruner.llm_layers:
            logits, labels = exit_step(self.llava, self.pruner, inputs, lengths, layer, self.image_token_id,
                                       **self.label_bound)
            self.val_router_accuracy.update(logits.argmax(-1), labels)
            self.val_exit_rate.update(labels.float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # val/accuracy and the "dyvte" row of the record
        none = self.val_none.compute()
        # compute() already gathered every process's counts: sync_dist only averages equal values.
        logged = {"val/accuracy_none": none["accuracy"]}
        for name, metric in (("val/router_accuracy", self.val_router_accuracy),
                             ("val/exit_label_rate", self.val_exit_rate),
                             ("val/prefill_flops_ratio", self.val_flops_ratio),
                             ("val/visual_tokens_layer_mean", self.val_layer_mean)):
            logged[name] = metric.compute()
            metric.reset()
        self.log_dict(logged, sync_dist=True)
        if not self.trainer.sanity_checking and self.val_record is not None:
            rows = self.val_record["rows"]
            rows[self.pruner.name].update({k.removeprefix("val/"): float(v) for k, v in logged.items()
                                           if k != "val/accuracy_none"})  # fmt: skip
            rows["none"] = {"accuracy": float(none["accuracy"]), "num_samples": int(none["total"]),
                            "accuracy_by_task": {t: float(a) for t, a in none["accuracy_by_task"].items()}}

    def training_record(self) -> dict:
        # LearnedCheckpointing's record (the parent's reads LoRA hyperparameters this module does not take).
        return {**LearnedCheckpointing.training_record(self), "budgets": None, "lora": None,
                "labels": {"agreement": AGREEMENT, **self.label_bound},
                "recipe": "DyVTE (METHODS.md §5.3): one exit layer per step, labels from copies with and without "
                "visual tokens, router cross-entropy; MLLM frozen, no LoRA"}
