"""`PrunedMLLM`: answer a benchmark's questions with a pruned MLLM and write what it cost."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytorch_lightning as pl
import torch

import pruners
from pruners import Pruner, registry

from .hf_model import chat_prompt, load_model_and_processor
from .metrics import VQAAccuracy, metric_for
from .results import write_json, write_jsonl

# results.json keys also logged through Lightning (shown in its end-of-run table).
LOGGED = ("accuracy", "visual_tokens", "prefill_flops", "prefill_latency_ms")


class PrunedMLLM(pl.LightningModule):
    """A Hugging Face MLLM with a visual-token pruner attached while it answers.

    Args:
        model_name_or_path: local Hugging Face folder of a supported family (LLaVA-1.5).
        pruner: the pruner, by registry name on the command line (`--model.pruner=fastv
            --model.pruner.budget=64`); None means no pruning (`none`).
        max_new_tokens: generation length (greedy).
        dtype: float32, bfloat16 or float16.
        attn_implementation: the model's attention ("sdpa", "eager", "flash_attention_2").
        prompt: question template; `{question}` is replaced by the benchmark's question.
    """

    def __init__(
        self,
        model_name_or_path: str = "checkpoints/tiny-llava-shapes",
        pruner: Pruner | None = None,
        max_new_tokens: int = 8,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        prompt: str = "{question}",
    ) -> None:
        super().__init__()
        # The pruner is a submodule (learned pruners have weights), so the checkpoint holds it.
        self.save_hyperparameters(ignore=["pruner"])
        if "{question}" not in prompt:
            raise ValueError(f"prompt must contain '{{question}}', got {prompt!r}")
        self.pruner = pruner if pruner is not None else pruners.build("none")
        self.model, self.processor = load_model_and_processor(model_name_or_path, dtype, attn_implementation)
        # Attach once now so a budget or layer that does not fit the model stops the run before any work.
        with pruners.attach(self.model, self.pruner):
            pass
        self.metric = VQAAccuracy()
        self.predictions: list[dict] = []
        self._attached = contextlib.ExitStack()
        self.report = None

    # ----- prompts and generation -----

    def build_prompt(self, question: str) -> str:
        """The model's chat template around one image and the templated question."""
        return chat_prompt(self.processor, self.hparams.prompt.format(question=question))

    def answer(self, images: list, questions: list[str]) -> list[str]:
        """Greedy answers (new tokens only) for a batch, with the pruner attached."""
        prompts = [self.build_prompt(q) for q in questions]
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    # ----- evaluation loop -----

    def setup(self, stage: str) -> None:
        # Task names come from the data, so the metric is built once the DataModule has loaded it.
        self.metric = metric_for(self.trainer.datamodule)

    def on_validation_epoch_start(self) -> None:
        self._start_epoch()

    def on_test_epoch_start(self) -> None:
        self._start_epoch()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_epoch()

    def on_test_epoch_end(self) -> None:
        self._finish_epoch()

    def teardown(self, stage: str) -> None:
        self._attached.close()  # an interrupted epoch must still leave the model unpruned

    def _start_epoch(self) -> None:
        # One attachment per epoch: the report then averages over every question of the epoch.
        self._attached.close()
        self.report = self._attached.enter_context(pruners.attach(self.model, self.pruner))
        self.metric.reset()
        self.predictions = []

    def _evaluate(self, batch: dict) -> None:
        predictions = self.answer(batch["image"], batch["question"])
        self.metric.update(predictions, batch)
        skipped = batch.get("skipped", [False] * len(predictions))  # unreadable images (the metric leaves them out)
        for i, prediction in enumerate(predictions):
            row = {key: batch[key][i] for key in ("id", "question", "answer", "task")}
            self.predictions.append({**row, "prediction": prediction, **({"skipped": True} if skipped[i] else {})})

    def _finish_epoch(self) -> None:
        scores = self.metric.compute()
        efficiency = self.report.as_dict()
        self._attached.close()
        results = self.results(scores, efficiency)
        if not self.trainer.sanity_checking:
            logged = {k: float(v) for k, v in results.items() if k in LOGGED and v is not None}
            self.log_dict(logged, batch_size=max(1, len(self.predictions)))
            if self.trainer.is_global_zero:
                self.write(results)

    def results(self, scores: dict, efficiency: dict) -> dict:
        """The results.json record: run identity, accuracy, efficiency report, pruner arguments."""
        name = self.pruner.name or type(self.pruner).__name__
        arguments = registry.arguments(name) if name in registry.available() else []
        return {
            "pruner": name,
            "budget": self.pruner.budget,
            "model": self.hparams.model_name_or_path,
            "benchmark": getattr(self.trainer.datamodule, "name", None),
            "accuracy": _number(scores["accuracy"]),
            "accuracy_by_task": {task: _number(acc) for task, acc in scores["accuracy_by_task"].items()},
            **efficiency,
            "num_samples": int(scores["total"]),  # questions scored (summed over processes)
            "num_skipped": sum(1 for row in self.predictions if row.get("skipped")),
            "metrics": {key: _json(value) for key, value in scores.items() if key not in CORE_SCORES},
            "pruner_args": {arg: getattr(self.pruner, arg) for arg in arguments if hasattr(self.pruner, arg)},
            "max_new_tokens": self.hparams.max_new_tokens,
            "dtype": self.hparams.dtype,
        }

    def write(self, results: dict) -> Path:
        """results.json and predictions.jsonl into the trainer's log folder; prints the path."""
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = write_json(folder / "results.json", results)
        write_jsonl(folder / "predictions.jsonl", self.predictions)
        print(f"results: {path}")
        return path



CORE_SCORES = ("accuracy", "accuracy_by_task", "total")  # written at the top level of results.json


def _json(value):
    """A benchmark's own score (a tensor, or a dict or list of them) as JSON numbers."""
    if isinstance(value, dict):
        return {key: _json(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return [_json(v) for v in value]
    return _number(value) if isinstance(value, torch.Tensor | float | int) else value


def _number(value: torch.Tensor) -> float | None:
    """A metric value as a JSON number (None for NaN, which JSON cannot hold)."""
    value = float(value)
    return None if math.isnan(value) else value
