"""How a pruner is wired into a model family. `attach` picks the runtime by model class.

Each runtime class declares what its family offers pruners: `provides`, a subset of
`pruners.base.SIGNALS` (a CLS token, hooks inside the vision encoder, attention among the visual
tokens, ...). A pruner declares what it needs (`Pruner.needs` plus what its stages imply); `attach`
rejects a pruner whose needs its family lacks, naming the missing signals and the pruners that can
run there. `support_matrix` derives pruner x family from the same declarations, so the README
table (`scripts/support_matrix.py`) and the tests cannot drift apart. A new family adds one entry
to `_runtimes` and a `provides` attribute on its runtime class.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..base import SIGNALS, Pruner
from ..registry import available, get
from ..report import EfficiencyReport


def _runtimes() -> dict:
    """Model class name -> runtime class."""
    from .llava import LlavaRuntime
    from .llava_next import LlavaNextRuntime
    from .qwen2_vl import QwenVLRuntime

    return {
        "LlavaForConditionalGeneration": LlavaRuntime,
        "LlavaNextForConditionalGeneration": LlavaNextRuntime,
        "Qwen2VLForConditionalGeneration": QwenVLRuntime,
        "Qwen2_5_VLForConditionalGeneration": QwenVLRuntime,
    }


def supported_families() -> list[str]:
    return sorted(_runtimes())


def runnable(family: str) -> list[str]:
    """Registered pruners whose needs the model class `family` provides."""
    provides = _runtimes()[family].provides
    return [name for name in available() if not get(name).missing(provides)]


def support_matrix() -> dict[str, dict[str, str]]:
    """pruner -> model class -> "yes", "<fallback label> variant" or "no: <missing signals>", from the declarations."""
    families = {name: runtime.provides for name, runtime in sorted(_runtimes().items())}
    matrix = {}
    for name in available():
        cls = get(name)
        row = {}
        for family, provides in families.items():
            lacking = cls.missing(provides)
            if lacking:
                row[family] = "no: " + ", ".join(sorted(lacking))
            else:
                row[family] = f"{cls.fallback_label} variant" if cls.uses_fallback(provides) else "yes"
        matrix[name] = row
    return matrix


def check_support(pruner: Pruner, family: str) -> None:
    """ValueError naming the missing signals and the runnable pruners if `pruner` cannot run on `family`."""
    lacking = type(pruner).missing(_runtimes()[family].provides)
    if lacking:
        what = "; ".join(f"{signal} ({SIGNALS[signal]})" for signal in sorted(lacking))
        raise ValueError(
            f"pruner {pruner.name!r} cannot run on {family}: it needs {what}, which {family} does not provide; "
            f"pruners that can run on {family}: {', '.join(runnable(family))}"
        )


@contextmanager
def attach(model, pruner: Pruner):
    """Apply `pruner` to `model` inside the block; yields the `EfficiencyReport`.

    The model's own call (`model.generate(...)`, `model(...)`) is used unchanged. On exit the
    model is restored exactly. Raises ValueError for an unsupported model family, a pruner that
    needs a signal the family does not provide, one whose budget or layers do not fit the model, or a
    learned pruner's checkpoint made for another model (`Pruner.on_attach`).
    """
    if not isinstance(pruner, Pruner):
        raise ValueError(f"attach expects a pruners.Pruner, got {type(pruner).__name__}; build one with pruners.build")
    name = type(model).__name__
    runtimes = _runtimes()
    if name not in runtimes:
        raise ValueError(f"model family {name} is not supported; supported: {', '.join(supported_families())}")
    check_support(pruner, name)
    undo = pruner.on_attach(model)  # a learned pruner checks the model and adds its adapter first
    try:
        runtime = runtimes[name](model, pruner)
        report: EfficiencyReport = runtime.__enter__()
        try:
            yield report
        finally:
            runtime.__exit__(None, None, None)
    finally:
        if undo is not None:
            undo()
