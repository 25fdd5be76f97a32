"""`none`: the unpruned oracle. Every visual token reaches every layer; no stage runs."""

from __future__ import annotations

from ..base import ModelInfo, Pruner
from ..registry import register


@register
class NoPruner(Pruner):
    """Keeps every token. Attaching it must reproduce the unpruned model exactly.

    `budget` is accepted so that configs can set it uniformly, but the only meaningful values
    are None and the model's full visual-token count (checked in `setup`).
    """

    name = "none"
    stages = frozenset()

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(budget)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.budget is not None and self.budget != info.visual_tokens:
            raise ValueError(
                f"none: budget {self.budget} would need pruning; `none` keeps every visual token, "
                f"so budget must be None or {info.visual_tokens}"
            )
