"""vtprune's pruning library: a registry of visual-token pruners and the runtime that attaches
them to Hugging Face MLLMs. Imports torch and transformers, never Lightning.

    import pruners
    pruners.available()
    pruner = pruners.build("fastv", budget=64)
    with pruners.attach(model, pruner) as report:
        out = model.generate(**inputs, max_new_tokens=16)
    report.as_dict()
    pruners.support_matrix()   # which pruner runs on which model family
"""

from . import learned, methods  # noqa: F401  (registers the built-in and the learned pruners)
from .base import ModelInfo, Pruner, Stage, TokenState
from .registry import available, build, register
from .runtime import attach, support_matrix

__all__ = ["ModelInfo", "Pruner", "Stage", "TokenState", "attach", "available", "build", "register", "support_matrix"]
