"""Pruner registry names as class names, so the CLI resolves `--model.pruner=fastv`.

`PrunedMLLM.pruner` is typed as the `pruners.Pruner` base class, which puts it in jsonargparse's
subclass mode: `--model.pruner=NAME` picks a class and `--model.pruner.ARG=VALUE` sets an argument of
its `__init__`. jsonargparse resolves a bare NAME to the known subclass whose import path ends in
NAME. Registry names ("fastv") are not class names ("FastV"), so this module defines, for every
registered pruner, a subclass that adds nothing and is named exactly like its registry name:
`--model.pruner=fastv` resolves to `lightning_modules.pruner_names.fastv`, whose arguments are
FastV's. The same holds for `pruner: fastv` in a YAML file.

jsonargparse accepts only identifiers in import paths, so a registry name such as "ficoco-v" gets
the alias class `ficoco_v` ("+" becomes "_plus"), and the CLI rewrites the name where the user
gives it: on the command line (`normalize_argv`) and in config files (`normalize_config_text`).
"""

import inspect

import yaml

import pruners as _pruners
from pruners import registry as _registry

_ALIASES: dict[str, type] = {}


def define_aliases() -> list[str]:
    """Give every registered pruner an alias class in this module; returns the names covered.

    Called at import and again by the CLI, so pruners registered after this import are covered.
    """
    for name in _pruners.available():
        cls, ident = _registry.get(name), identifier(name)
        if getattr(_ALIASES.get(ident), "__bases__", None) == (cls,):
            continue
        if ident in globals() and ident not in _ALIASES or ident in _ALIASES and _ALIASES[ident].name != name:
            raise RuntimeError(f"pruner name {name!r} clashes with a name in {__name__}")
        alias = type(ident, (cls,), {"__module__": __name__, "__qualname__": ident, "__doc__": cls.__doc__})
        _ALIASES[ident] = alias
        globals()[ident] = alias
    return sorted(_ALIASES)


def identifier(name: str) -> str:
    """The alias class name of a registry name: "ficoco-v" -> "ficoco_v", "prumerge+" -> "prumerge_plus"."""
    return name.replace("+", "_plus").replace("-", "_")


def normalize(value):
    """A pruner value as the user wrote it (name, or dict with class_path) with registry names aliased."""
    if isinstance(value, str) and value in _pruners.available():
        return identifier(value)
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return {**value, "class_path": normalize(value["class_path"])}
    return value


def normalize_argv(args: list[str]) -> list[str]:
    """Rewrite `--model.pruner=NAME` / `--model.pruner NAME` so hyphenated names resolve."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--model.pruner="):
            out[i] = "--model.pruner=" + normalize(arg.split("=", 1)[1])
        elif arg == "--model.pruner" and i + 1 < len(out):
            out[i + 1] = normalize(out[i + 1])
    return out


def normalize_config_text(text: str) -> str:
    """Rewrite `model.pruner` of a YAML config; returns the text untouched when nothing changes."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # let the parser report it
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or "pruner" not in model:
        return text
    new = normalize(model["pruner"])
    if new == model["pruner"]:
        return text
    model["pruner"] = new
    return yaml.safe_dump(cfg, sort_keys=False)


def describe() -> str:
    """Every registered pruner with its arguments and defaults, for error messages."""
    lines = ["known pruners (--model.pruner=NAME) and their arguments (--model.pruner.ARG=VALUE):"]
    for name in _pruners.available():
        params = inspect.signature(_registry.get(name).__init__).parameters
        empty = inspect.Parameter.empty
        args = [a if params[a].default is empty else f"{a}={params[a].default!r}" for a in _registry.arguments(name)]
        lines.append(f"  {name}: {', '.join(args) or '(no arguments)'}")
    return "\n".join(lines)


define_aliases()
