"""`LearnedPrunerTraining`: a learned pruner (`gate`) trained end to end against the frozen MLLM.

    vtprune fit -c configs/experiment/train_gate.yaml

Each step attaches the pruner at one budget (`budgets`, drawn per step from the seed and the step, so DDP ranks
agree and a resumed run draws the same sequence) and scores the answer the pruned model gives, with the loss
`QAFinetuning` uses: cross-entropy on the answer word and its `</s>`. The pass is the inference pass: the prompt
(image + question) runs as a prefill through the runtime with the pruner acting (so the pruner sees only the
prompt, never the answer), then the answer tokens run as one decoding chunk against the pruned KV cache. The
pruner's differentiable path (the gate's straight-through top-k: kept tokens times an exact 1 that carries the
gradient, dropped tokens out of the sequence) takes the loss's gradient back to its scores. The MLLM is frozen;
with `lora_rank` > 0, peft LoRA adapters on the LLM's attention projections (q/v by default) train beside the
pruner, so the LLM adapts to its pruned input.

Validation (during fit, on the DataModule's val slice) answers each question greedily with the pruner attached
at each budget, exactly as `vtprune validate` (`PrunedMLLM.answer`) does, so a published checkpoint validated
later gives the same numbers. Logged, every value through torchmetrics: train/loss, train/samples_per_s (both on
the progress bar), val/accuracy (mean over budgets), val/accuracy_<budget>, val/<task>_<budget>.

Before any training the module attaches the pruner once per budget, so an unknown or untrainable pruner, a
budget the model cannot hold or a checkpoint folder of another model stops with a ValueError (the CLI prints it
as a usage error).

Checkpoints (`LearnedCheckpointing`) hold only what trains (pruner and LoRA weights: the frozen MLLM is in its
own folder), plus `checkpoint["learned_pruner"]`: everything scripts/publish_checkpoint.py needs to write a
checkpoint folder without loading the model. A sibling training module (DyVTE's) gets the same by inheriting
`LearnedCheckpointing` and setting `val_record` in its validation (see `LearnedCheckpointing`).
"""

from __future__ import annotations

import math
import random
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

import pruners
from pruners import Pruner, registry
from pruners.learned.checkpoint import LearnedPruner, adapter_payload, model_identity, pruner_arguments

from .hf_model import chat_prompt, load_model_and_processor
from .metrics import metric_for
from .training_utils import adamw_cosine

PAYLOAD_KEY = "learned_pruner"
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def learned_pruners() -> list[str]:
    """Registered pruners with weights to train."""
    return [name for name in registry.available() if issubclass(registry.get(name), LearnedPruner)]


def budget_for_step(budgets: list[int | None], seed: int, step: int) -> int | None:
    """The training budget of step `step`: uniform over `budgets`, a function of (seed, step) only."""
    return random.Random(seed * 1_000_003 + step).choice(budgets)


class LearnedCheckpointing:
    """Lightning checkpoint hooks for a module that trains `self.pruner` on a frozen `self.llava`.

    Checkpoints keep the trainable weights only (the frozen model reloads from its folder; `strict_loading` is
    off so a resume accepts the missing keys) and add `checkpoint["learned_pruner"]` (`payload`). The module sets:
    `base_model` (`model_identity` of the MLLM, taken before any adapter is added), `val_record` after each
    validation ({"step": global step, "rows": {label: {"accuracy", "accuracy_by_task", ...}}}), and may override
    `pruner_arguments` and `training_record`.
    """

    pruner: Pruner
    llava: nn.Module
    base_model: dict
    val_record: dict | None = None

    def pruner_arguments(self) -> dict:
        """The arguments pruner.json records (the pruner's own, resolved)."""
        return pruner_arguments(self.pruner)

    def training_record(self) -> dict:
        """Free-form facts about the run for pruner.json and the model card."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return {"module": type(self).__name__, "hyperparameters": dict(self.hparams), "step": self.global_step,
                "data": type(datamodule).__name__ if datamodule is not None else None,
                "data_seed": getattr(datamodule, "seed", None)}

    def adapter(self) -> dict | None:
        decoder = self.llava.get_decoder()
        return adapter_payload(decoder) if hasattr(decoder, "peft_config") else None

    def payload(self) -> dict:
        return {
            "pruner": self.pruner.name, "arguments": self.pruner_arguments(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.pruner.state_dict().items()},
            "base_model": self.base_model, "adapter": self.adapter(), "training": self.training_record(),
            "validation": self.val_record, "step": self.global_step,
        }  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable or k.startswith("pruner.")}  # fmt: skip
        checkpoint[PAYLOAD_KEY] = self.payload()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_record = (checkpoint.get(PAYLOAD_KEY) or {}).get("validation")  # a resumed run keeps its last


class LearnedPrunerTraining(LearnedCheckpointing, pl.LightningModule):
    """Trains a learned pruner (and optionally LoRA on the LLM) against a frozen MLLM.

    Args:
        pruner: a learned pruner (`--model.init_args.pruner=gate`, its arguments under `.init_args`); may start
            from a checkpoint folder (`checkpoint=`) without an adapter.
        model_name_or_path: local Hugging Face folder of the MLLM (LLaVA-1.5 family).
        budgets: the budgets training draws from (one per step) and validation scores; None: the pruner's own
            (a pruner without a budget, e.g. adaptive ones).
        lora_rank: rank of the LoRA adapters on the LLM (0: none). lora_alpha: their scale numerator (None:
            2 x rank, so the update is scaled by 2). lora_dropout: on the adapters' input. lora_targets: the
            decoder's linear layers that get adapters.
        lr, weight_decay, warmup_steps: AdamW, linear warm-up, cosine decay to 0 at the last step.
        max_new_tokens: validation's greedy generation length (as `PrunedMLLM`).
        prompt: question template; `{question}` is replaced by the question (as `PrunedMLLM`).
        seed: seeds the per-step budget.
        dtype, attn_implementation: how the MLLM is loaded (`PrunedMLLM`'s meaning).
    """

    def __init__(
        self,
        pruner: Pruner,
        model_name_or_path: str = "checkpoints/tiny-llava-shapes",
        budgets: list[int] | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_targets: list[str] = list(DEFAULT_LORA_TARGETS),  # noqa: B006  (jsonargparse reads the default)
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        max_new_tokens: int = 8,
        prompt: str = "{question}",
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pruner"])
        self.strict_loading = False  # checkpoints hold the trained weights only (LearnedCheckpointing)
        if "{question}" not in prompt:
            raise ValueError(f"prompt must contain '{{question}}', got {prompt!r}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0: no LoRA), got {lora_rank!r}")
        if budgets is not None and not budgets:
            raise ValueError("budgets must be a non-empty list of ints, or None for the pruner's own")
        self.pruner = pruner
        self.budgets: list[int | None] = list(budgets) if budgets is not None else [None]
        self.llava, self.processor = load_model_and_processor(model_name_or_path, dtype, attn_implementation)
        self.llava.requires_grad_(False)
        self.base_model = model_identity(self.llava)
        self.check_pruner()
        if lora_rank:
            self.add_lora()
        self.train_loss, self.samples_per_s = MeanMetric(), MeanMetric()
        self.val_metrics = nn.ModuleList()
        self.val_answers: dict[str, list[str]] = {}
        self._step_started: float | None = None

    # ----- configuration checks (before any training) -----

    def check_pruner(self) -> None:
        """Stop on a pruner that cannot be trained here, before any work: ValueError saying what is allowed."""
        name = self.pruner.name
        if not isinstance(self.pruner, LearnedPruner):
            learned = ", ".join(learned_pruners())
            raise ValueError(f"pruner {name!r} has no weights to train; learned pruners: {learned}")
        if self.pruner.adapter is not None:
            raise ValueError(f"{name}: checkpoint {self.pruner.checkpoint} has a LoRA adapter; training goes on only "
                             "from a checkpoint without one (use it for validation instead)")
        for budget in self.budgets:  # each attach checks the budget and the checkpoint's model
            if budget is not None:
                self.pruner.use_budget(budget)
            with pruners.attach(self.llava, self.pruner):
                pass
        if not any(p.requires_grad for p in self.pruner.parameters()):
            raise ValueError(f"pruner {name!r} has no trainable parameters on this model")

    def add_lora(self) -> None:
        """peft LoRA adapters on the decoder's `lora_targets` (B initialised to 0: training starts from the model)."""
        from peft import LoraConfig, inject_adapter_in_model

        hp = self.hparams
        config = LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha or 2 * hp.lora_rank,
                            lora_dropout=hp.lora_dropout, target_modules=list(hp.lora_targets))  # fmt: skip
        inject_adapter_in_model(config, self.llava.get_decoder())

    # ----- inputs -----

    def prompts(self, questions: list[str]) -> list[str]:
        """Chat-formatted prompts, as `PrunedMLLM.build_prompt` writes them."""
        return [chat_prompt(self.processor, self.hparams.prompt.format(question=q)) for q in questions]

    def prompt_inputs(self, images: list, questions: list[str]) -> dict:
        """Left-padded model inputs of the prompts (image + question), as `PrunedMLLM.answer` builds them."""
        inputs = self.processor(images=images, text=self.prompts(questions), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.llava.dtype)
        return inputs

    def answer_tokens(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids of " {answer}</s>" per sample, right-padded, and their (B, T) mask."""
        tokenizer = self.processor.tokenizer
        rows = tokenizer([f" {a}{tokenizer.eos_token}" for a in answers], add_special_tokens=False)["input_ids"]
        if any(tokenizer.unk_token_id in row for row in rows):
            raise ValueError(f"an answer holds a word the tokenizer does not know: {answers}")
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        return ids.to(self.device), mask.to(self.device)

    # ----- the pruned answer -----

    def answer_logits(self, prompt: dict, answer: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the pruned model at each answer position (logit t predicts answer token t): the
        prompt as a prefill with the pruner acting, the answer as one decoding chunk on the pruned cache."""
        valid = prompt["attention_mask"]
        positions = (valid.cumsum(-1) - 1).clamp(min=0)  # as generate gives a left-padded batch
        with pruners.attach(self.llava, self.pruner):
            out = self.llava(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)
            logits = [out.logits[:, -1:]]
            if answer.shape[1] > 1:
                chunk = valid.sum(-1, keepdim=True) + torch.arange(answer.shape[1] - 1, device=answer.device)
                more = self.llava(input_ids=answer[:, :-1], position_ids=chunk, past_key_values=out.past_key_values,
                                  use_cache=True)  # fmt: skip
                logits.append(more.logits)
        return torch.cat(logits, 1)

    def loss(self, batch: dict, budget: int | None) -> torch.Tensor:
        """Answer cross-entropy of the model pruned at `budget` (the answer word and its `</s>`)."""
        if budget is not None:
            self.pruner.use_budget(budget)
        answer, mask = self.answer_tokens(batch["answer"])
        logits = self.answer_logits(self.prompt_inputs(batch["image"], batch["question"]), answer)
        return F.cross_entropy(logits[mask].float(), answer[mask])

    # ----- training -----

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Lightning keeps each submodule's own mode: the pruner (built in eval mode) trains, the MLLM is frozen
        # (no dropout) ...
        self.pruner.train()
        self.llava.eval()
        for name, module in self.llava.named_modules():
            if "lora_dropout" in name:
                module.train()  # ... except the adapters' own
        now = time.perf_counter()
        if self._step_started is not None:  # one whole step: data, forward, backward, optimizer
            size = len(batch["question"])
            self.samples_per_s(size / max(now - self._step_started, 1e-9))
            self.log("train/samples_per_s", self.samples_per_s, prog_bar=True, batch_size=size)
        self._step_started = now

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        budget = budget_for_step(self.budgets, self.hparams.seed, self.global_step)
        loss = self.loss(batch, budget)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, prog_bar=True, batch_size=len(batch["question"]))
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_cosine(self.trainable_parameters(), hp.lr, hp.weight_decay, min(hp.warmup_steps, total), total)

    # ----- validation -----

    def setup(self, stage: str) -> None:
        # Task names come from the data, so the metrics are built once the DataModule has loaded it.
        datamodule = self.trainer.datamodule
        self.val_metrics = nn.ModuleList(metric_for(datamodule) for _ in self.budgets).to(self.device)

    def label(self, budget: int | None) -> str:
        return self.pruner.name if budget is None else str(budget)

    def answer(self, batch: dict, budget: int | None) -> list[str]:
        """Greedy answers with the pruner attached at `budget`, exactly as `PrunedMLLM.answer`."""
        if budget is not None:
            self.pruner.use_budget(budget)
        inputs = self.prompt_inputs(batch["image"], batch["question"])
        with pruners.attach(self.llava, self.pruner):
            output = self.llava.generate(**inputs, max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def on_validation_epoch_start(self) -> None:
        self._step_started = None  # validation time is not training throughput
        self.val_answers = {self.label(b): [] for b in self.budgets}
        for metric in self.val_metrics:
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for budget, metric in zip(self.budgets, self.val_metrics):
            answers = self.answer(batch, budget)
            metric.update(answers, batch)
            self.val_answers[self.label(budget)] += answers

    def on_validation_epoch_end(self) -> None:
        rows, logged = {}, {}
        for budget, metric in zip(self.budgets, self.val_metrics):
            scores, label = metric.compute(), self.label(budget)
            rows[label] = {"accuracy": float(scores["accuracy"]),
                           "accuracy_by_task": {t: float(a) for t, a in scores["accuracy_by_task"].items()},
                           "num_samples": int(scores["total"])}  # fmt: skip
            logged[f"val/accuracy_{label}"] = scores["accuracy"]
            logged.update({f"val/{task}_{label}": acc for task, acc in scores["accuracy_by_task"].items()})
        accuracies = [row["accuracy"] for row in rows.values() if not math.isnan(row["accuracy"])]
        logged["val/accuracy"] = torch.tensor(sum(accuracies) / max(1, len(accuracies)))
        self.log_dict(logged)
        if not self.trainer.sanity_checking:
            self.val_record = {"step": self.global_step, "rows": rows}

    # ----- what a published checkpoint records -----

    def pruner_arguments(self) -> dict:
        # The stored default budget is the first trained one (the pruner's budget moved with every step).
        first = self.budgets[0]
        return {**pruner_arguments(self.pruner), **({} if first is None else {"budget": first})}

    def training_record(self) -> dict:
        hp = self.hparams
        lora = None if not hp.lora_rank else {"rank": hp.lora_rank, "alpha": hp.lora_alpha or 2 * hp.lora_rank,
                                              "dropout": hp.lora_dropout, "targets": list(hp.lora_targets)}
        return {**super().training_record(), "budgets": self.budgets, "lora": lora}
