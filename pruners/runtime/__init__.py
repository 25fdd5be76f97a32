"""How a pruner is wired into a model family. `attach` picks the runtime by model class."""

from __future__ import annotations

from contextlib import contextmanager

from ..base import Pruner
from ..report import EfficiencyReport


def _runtimes() -> dict:
    from .llava import LlavaRuntime

    return {"LlavaForConditionalGeneration": LlavaRuntime}


def supported_families() -> list[str]:
    return sorted(_runtimes())


@contextmanager
def attach(model, pruner: Pruner):
    """Apply `pruner` to `model` inside the block; yields the `EfficiencyReport`.

    The model's own call (`model.generate(...)`, `model(...)`) is used unchanged. On exit the
    model is restored exactly. Raises ValueError for an unsupported model family or a pruner
    whose budget or layers do not fit the model.
    """
    if not isinstance(pruner, Pruner):
        raise ValueError(f"attach expects a pruners.Pruner, got {type(pruner).__name__}; build one with pruners.build")
    name = type(model).__name__
    runtimes = _runtimes()
    if name not in runtimes:
        raise ValueError(f"model family {name} is not supported; supported: {', '.join(supported_families())}")
    runtime = runtimes[name](model, pruner)
    report: EfficiencyReport = runtime.__enter__()
    try:
        yield report
    finally:
        runtime.__exit__(None, None, None)
