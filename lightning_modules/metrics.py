"""Exact-match VQA accuracy, overall and per task, as a DDP-safe torchmetrics `Metric`."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: "The Red." -> "the red"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class VQAAccuracy(Metric):
    """Exact match after `normalize_answer`, overall and for each task in `tasks`.

    Task names are fixed at construction so every process holds states of the same shape,
    which `dist_reduce_fx="sum"` adds up across processes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tasks: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.tasks = list(dict.fromkeys(tasks))
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("task_correct", torch.zeros(len(self.tasks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("task_total", torch.zeros(len(self.tasks), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Sequence]) -> None:
        """Score `predictions` against `batch["answer"]` (per `batch["task"]` when the metric has tasks)."""
        answers = batch["answer"]
        tasks = batch.get("task") if self.tasks else None
        if len(predictions) != len(answers) or (tasks is not None and len(tasks) != len(answers)):
            raise ValueError("predictions, answers and tasks must have the same length")
        hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
        self.correct += sum(hits)
        self.total += len(hits)
        for task, hit in zip(tasks or (), hits):
            if task not in self.tasks:
                raise ValueError(f"task {task!r} is not one of the metric's tasks {self.tasks}")
            i = self.tasks.index(task)
            self.task_correct[i] += int(hit)
            self.task_total[i] += 1

    def compute(self) -> dict[str, Tensor | dict[str, Tensor]]:
        """{"accuracy": overall in 0..1, "accuracy_by_task": {task: accuracy} (tasks seen only), "total": count}."""
        by_task = {
            task: self.task_correct[i].float() / self.task_total[i]
            for i, task in enumerate(self.tasks)
            if self.task_total[i] > 0
        }
        overall = self.correct.float() / self.total if self.total > 0 else torch.tensor(float("nan"))
        return {"accuracy": overall, "accuracy_by_task": by_task, "total": self.total.clone()}


def metric_for(datamodule) -> Metric:
    """The metric of `datamodule` (call after its setup): its own `metric()` when it has one (the standard
    benchmarks, `lightning_modules.benchmarks`), else a `VQAAccuracy` over its tasks."""
    if hasattr(datamodule, "metric"):
        return datamodule.metric()
    tasks = getattr(datamodule, "tasks", None) if datamodule is not None else None
    return VQAAccuracy(tasks or ())
