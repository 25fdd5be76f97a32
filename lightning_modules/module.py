"""`PrunedMLLM`: answer a benchmark's questions with a pruned MLLM and write what it cost."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import pytorch_lightning as pl
import torch

import pruners
from pruners import Pruner, registry
from pruners.report import SampleRecord

from .hf_model import chat_prompt, load_model_and_processor
from .metrics import VQAAccuracy, metric_for
from .predictions import append_predictions, read_predictions
from .results import write_json, write_jsonl

# results.json keys also logged through Lightning (shown in its end-of-run table).
LOGGED = ("accuracy", "visual_tokens", "prefill_flops", "prefill_latency_ms")
# Report keys measured by the clock: they cover only the samples generated in this process.
TIMINGS = ("prefill_latency_ms", "pruner_latency_ms", "decode_latency_ms_per_token")


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
        resume: reuse the samples already in the log folder's predictions.jsonl (a killed run's rows are
            appended batch by batch): they are scored again but not generated again. Needs a log folder
            that stays the same across runs (`scripts/sweep.py` sets one). False starts the file afresh.
    """

    def __init__(
        self,
        model_name_or_path: str = "checkpoints/tiny-llava-shapes",
        pruner: Pruner | None = None,
        max_new_tokens: int = 8,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        prompt: str = "{question}",
        resume: bool = False,
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
        self._stored: dict[str, dict] = {}  # id -> row read back from predictions.jsonl (resume)
        self._resumed = 0  # samples of this epoch taken from `_stored`
        self._append_to: Path | None = None  # where each batch's rows go (rank 0 only; None in sanity checks)
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
        self._resumed = 0
        self._stored = {}
        self._append_to = None
        if self.trainer.sanity_checking:
            return
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.jsonl"
        rows = read_predictions(path) if self.hparams.resume else []
        self._stored = {str(row["id"]): row for row in rows if _reusable(row)}
        if self.trainer.is_global_zero:  # one writer (the final predictions.jsonl is rank 0's too)
            # Rewrite what was kept (atomically) so appends start on a fresh line after a torn one.
            write_jsonl(path, list(self._stored.values()))
            self._append_to = path

    def _evaluate(self, batch: dict) -> None:
        ids = [str(i) for i in batch["id"]]
        todo = [i for i, sample_id in enumerate(ids) if sample_id not in self._stored]
        first = len(self.report.samples)
        answers = self.answer([batch["image"][i] for i in todo], [batch["question"][i] for i in todo]) if todo else []
        # The runtime records one cost per generated sample, in batch order; they travel with the row.
        generated = dict(zip(todo, zip(answers, self.report.samples[first:], strict=True)))
        skipped = batch.get("skipped", [False] * len(ids))  # unreadable images (the metric leaves them out)
        rows = []
        for i, sample_id in enumerate(ids):
            if i in generated:
                prediction, cost = generated[i]
                row = {key: batch[key][i] for key in ("id", "question", "answer", "task")}
                row = {**row, "prediction": prediction, **({"skipped": True} if skipped[i] else {})}
                row["cost"] = dataclasses.asdict(cost)
                rows.append(row)
            else:
                # Read back, not generated: its stored cost counts toward tokens, FLOPs and KV cache.
                row = self._stored[sample_id]
                self.report.samples.append(SampleRecord(**row["cost"]))
                self._resumed += 1
            self.predictions.append(row)
        # The metric sees every sample of the batch once, with the batch's own record fields.
        self.metric.update([row["prediction"] for row in self.predictions[-len(ids) :]], batch)
        if self._append_to is not None:
            append_predictions(self._append_to, rows)

    def _finish_epoch(self) -> None:
        scores = self.metric.compute()
        efficiency = self.report.as_dict()
        self._attached.close()
        if self._resumed == len(self.predictions):  # nothing was timed in this process
            efficiency.update(dict.fromkeys(TIMINGS))
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
            # Latencies average over the samples generated in this process; a resumed run reused the rest.
            "resumed_samples": self._resumed,
            "latency_samples": len(self.predictions) - self._resumed,
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


def _reusable(row: dict) -> bool:
    """A stored row can stand in for generation when it has its prediction and a cost this version reads."""
    try:
        SampleRecord(**row["cost"])
    except (KeyError, TypeError):
        return False
    return "id" in row and "prediction" in row


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
