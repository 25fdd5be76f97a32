"""The pruner registry: `register`, `build`, `available`."""

from __future__ import annotations

import inspect
import re
from typing import TypeVar

from .base import SIGNALS, Pruner

_REGISTRY: dict[str, type[Pruner]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_+\-]*$")
P = TypeVar("P", bound=type[Pruner])


def register(cls: P) -> P:
    """Class decorator: add a `Pruner` subclass under its `name`."""
    name = getattr(cls, "name", "")
    if not (isinstance(cls, type) and issubclass(cls, Pruner)):
        raise TypeError(f"register expects a Pruner subclass, got {cls!r}")
    if not _NAME.match(name):
        raise ValueError(f"pruner name {name!r} must match {_NAME.pattern}")
    declared = set(cls.needs) | set(cls.fallback_needs or ())
    if declared - set(SIGNALS):
        unknown = sorted(declared - set(SIGNALS))
        raise ValueError(f"pruner {name!r} needs unknown signal(s) {unknown}; allowed: {', '.join(SIGNALS)}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pruner name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Sorted names of every registered pruner."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Pruner]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruner {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def arguments(name: str) -> list[str]:
    """Keyword arguments the pruner `name` accepts."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(get(name).__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in kinds]


def build(name: str, **kwargs) -> Pruner:
    """Build the pruner `name`. Unknown names and arguments raise ValueError naming what is allowed."""
    cls = get(name)
    allowed = arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"pruner {name!r} got unknown argument(s) {unknown}; allowed: {allowed}")
    return cls(**kwargs)
