"""Learned pruners: pruners with weights, trained against the frozen MLLM (`vtprune fit`), saved and loaded as
checkpoint folders (`pruners.learned.checkpoint`: the folder format and `LearnedPruner`, their base class).

    pruners.build("gate", checkpoint="checkpoints/<name>")      # offline, checked against the model at attach

Importing this package registers them (a new one adds its module below).
"""

from . import dyvte, gate  # noqa: F401
from .checkpoint import LearnedPruner, load_pruner, model_identity

__all__ = ["LearnedPruner", "load_pruner", "model_identity"]
