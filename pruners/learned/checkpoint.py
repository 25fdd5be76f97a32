"""The checkpoint folder every learned pruner uses, and `LearnedPruner`, the base class that reads it.

A folder (hub-ready: `huggingface_hub.upload_folder` takes it as it is):

    pruner.json         {"format", "format_version", "pruner": registry name, "arguments": what rebuilds it,
                         "base_model": the identity of the model it was trained on (`model_identity`),
                         "adapter": "adapter" or null, "training": free-form record (budgets, recipe, metrics)}
    model.safetensors   the pruner's own weights (its `state_dict`)
    adapter/            optional: the peft LoRA adapter of the LLM, as `PeftModel.save_pretrained` writes it
                        (adapter_config.json, adapter_model.safetensors), relative to the decoder
                        (`model.get_decoder()`), so `PeftModel.from_pretrained(model.get_decoder(), folder)` loads it
    README.md           the model card (written by scripts/publish_checkpoint.py)

`pruners.build(name, checkpoint=folder)` (or `--model.pruner=NAME --model.pruner.checkpoint=folder`) loads it
offline for any learned pruner; arguments given beside it that differ from their defaults override the stored
ones (`--model.pruner.budget=128` on a gate). At attach the model is compared with `base_model`: a folder made
for another model (other architecture, sizes, configuration or weights) stops with a ValueError naming the
differences, before any work; then the adapter, if any, is added to the decoder for as long as the pruner is
attached (leaving `attach` removes it: the model is restored exactly).

A new learned pruner subclasses `LearnedPruner` and follows the pattern of `pruners.learned.gate.GatePruner`:

    def __init__(self, budget=None, width=None, ..., checkpoint: str | None = None) -> None:
        super().__init__(locals())       # reads pruner.json; self.resolved = the arguments to build from
        args = self.resolved
        ...                              # build the weights from args (all of them when a checkpoint gives sizes)
        self.ready()                     # loads model.safetensors (if a checkpoint) and sets eval mode

Every `__init__` argument must be kept as an attribute of the same name (resolved in `setup` where the model
decides it, e.g. a width), so `pruner_arguments` can record what rebuilds the pruner.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..base import Pruner

FORMAT = "vtprune-learned-pruner"
FORMAT_VERSION = 1
PRUNER_FILE = "pruner.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # key prefix of a PeftModel's saved adapter weights
# Config keys that do not change what the model computes (paths, dtype, versions, output switches).
RUNTIME_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "architectures", "use_cache",
                          "output_attentions", "output_hidden_states", "return_dict"})  # fmt: skip
FINGERPRINT_VALUES = 16  # values sampled from each fingerprinted weight
FINGERPRINT_RTOL = 1e-2  # bf16 storage rounds each value by up to 0.4%


# -- the model a checkpoint belongs to ----------------------------------------------------------------------------


def _config_dict(value):
    """A config as plain data without the keys in RUNTIME_KEYS and private ones, recursively."""
    if isinstance(value, dict):
        kept = {str(k): v for k, v in value.items() if k not in RUNTIME_KEYS}
        return {k: _config_dict(v) for k, v in kept.items() if not k.startswith("_")}
    if isinstance(value, list | tuple):
        return [_config_dict(v) for v in value]
    return value


def config_hash(config) -> str:
    """sha256 of the model's configuration (nested vision/text configs included), without dtype, paths and
    versions, so a model saved in float32 and loaded in bfloat16 keeps its hash."""
    text = json.dumps(_config_dict(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprinted(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights whose sampled values identify a trained model: the input embeddings and the first and
    last parameters of two or more dimensions (on LLaVA: the vision patch embedding and the LM head)."""
    named = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    chosen = dict([named[0], named[-1]]) if named else {}
    embeddings = model.get_input_embeddings()
    if embeddings is not None:
        name = next((n for n, p in model.named_parameters() if p is embeddings.weight), "input_embeddings")
        chosen[name] = embeddings.weight
    return chosen


def weight_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """FINGERPRINT_VALUES evenly spaced values of each `_fingerprinted` weight: two models of the same
    configuration but other training (or seeds) differ there, while a change of dtype does not."""
    out = {}
    for name, weight in _fingerprinted(model).items():
        flat = weight.detach().flatten()
        index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_VALUES).long().to(flat.device)
        out[name] = [float(v) for v in flat[index].float().cpu()]
    return out


def model_identity(model: nn.Module) -> dict:
    """What identifies the model a learned pruner is trained on: class, model_type, sizes, a hash of the
    configuration and a fingerprint of the weights (`name_or_path` is recorded, never compared)."""
    cfg = model.config
    text = getattr(cfg, "text_config", cfg)
    vision = getattr(cfg, "vision_config", None)
    sizes = {
        "llm_width": getattr(text, "hidden_size", None), "llm_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None), "vision_width": getattr(vision, "hidden_size", None),
        "vision_layers": getattr(vision, "num_hidden_layers", None), "image_size": getattr(vision, "image_size", None),
        "patch_size": getattr(vision, "patch_size", None),
    }  # fmt: skip
    return {
        "architecture": type(model).__name__, "model_type": cfg.model_type,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or ""), "sizes": sizes,
        "config_sha256": config_hash(cfg), "weights": weight_fingerprint(model),
    }  # fmt: skip


def identity_differences(stored: dict, current: dict) -> list[str]:
    """How `current` (a `model_identity`) differs from `stored`; empty when it is the same model."""
    problems = [
        f"{key} {current.get(key)!r} (trained on {stored.get(key)!r})"
        for key in ("architecture", "model_type")
        if stored.get(key) != current.get(key)
    ]
    sizes, now = stored.get("sizes", {}), current.get("sizes", {})
    problems += [f"{key} {now.get(key)} (trained on {sizes[key]})" for key in sizes if sizes[key] != now.get(key)]
    if not problems and stored.get("config_sha256") != current.get("config_sha256"):
        problems.append("another configuration (config_sha256 differs)")
    if not problems:
        weights, now_weights = stored.get("weights", {}), current.get("weights", {})
        for name, values in weights.items():
            if name not in now_weights or not torch.allclose(
                torch.tensor(now_weights[name]), torch.tensor(values), rtol=FINGERPRINT_RTOL, atol=1e-6
            ):
                problems.append(f"other weights ({name} differs)")
                break
    return problems


def describe_model(identity: dict) -> str:
    sizes = ", ".join(f"{k}={v}" for k, v in identity.get("sizes", {}).items() if v is not None)
    name = identity.get("name_or_path") or "?"
    return f"{identity.get('architecture')} {name!r} ({sizes})"


# -- reading and writing the folder -------------------------------------------------------------------------------


def read_pruner_json(folder: str | Path) -> dict:
    """The folder's pruner.json, checked; ValueError naming the folder and what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist; allowed: a folder written by "
                         "scripts/publish_checkpoint.py (pruner.json, model.safetensors)")
    path = folder / PRUNER_FILE
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ValueError(f"{folder} is not a learned-pruner checkpoint: no {PRUNER_FILE} (found: {found})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"allowed: {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def pruner_arguments(pruner: Pruner) -> dict:
    """What rebuilds `pruner` with `pruners.build`: each registry argument's attribute of the same name (as
    `setup` resolved it: a width, a default budget), `checkpoint` aside."""
    from ..registry import arguments

    names = [n for n in arguments(pruner.name) if n != "checkpoint"]
    return {name: getattr(pruner, name) for name in names if hasattr(pruner, name)}


def save_pruner(folder: str | Path, pruner: Pruner, base_model: dict, arguments: dict | None = None,
                adapter: dict | None = None, training: dict | None = None) -> Path:
    """Write `pruner` as a checkpoint folder (README.md aside). `arguments` override its recorded ones (the
    training module stores the gate's default budget); `adapter`: {"config": peft config dict, "state_dict":
    peft-format weights} (`adapter_payload`); `training`: free-form record kept in pruner.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = {**pruner_arguments(pruner), **(arguments or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in pruner.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    if adapter is not None:
        save_adapter(folder / ADAPTER_DIR, adapter)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "pruner": pruner.name,
            "arguments": _jsonable(args), "base_model": base_model,
            "adapter": ADAPTER_DIR if adapter is not None else None, "training": training or {}}  # fmt: skip
    (folder / PRUNER_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return folder


def load_pruner(folder: str | Path, **overrides) -> Pruner:
    """The pruner a checkpoint folder holds, built by its stored registry name (`overrides` as in build)."""
    from ..registry import build

    return build(read_pruner_json(folder)["pruner"], checkpoint=str(folder), **overrides)


# -- the LoRA adapter ---------------------------------------------------------------------------------------------


def adapter_payload(decoder: nn.Module) -> dict:
    """{"config", "state_dict"} of the LoRA adapter injected into `decoder` (peft's `inject_adapter_in_model`),
    keyed as `PeftModel.save_pretrained` keys them, ready for `save_adapter` or a Lightning checkpoint."""
    from peft import get_peft_model_state_dict

    config = decoder.peft_config["default"]
    state = get_peft_model_state_dict(decoder)
    return {"config": json.loads(json.dumps(config.to_dict(), default=sorted)),
            "state_dict": {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}}


def save_adapter(folder: str | Path, payload: dict) -> Path:
    """adapter_config.json and adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(payload["config"], indent=2) + "\n")
    save_file(dict(payload["state_dict"]), folder / ADAPTER_WEIGHTS)
    return folder


def apply_adapter(model: nn.Module, folder: str | Path) -> Callable[[], None]:
    """Add the LoRA adapter in `folder` to the model's decoder (in place); returns what removes it again.

    peft wraps the decoder's target projections and freezes the decoder's own weights; the undo unwraps
    them (the original modules come back) and restores every requires_grad flag.
    """
    from peft import PeftModel

    decoder = model.get_decoder()
    flags = {name: p.requires_grad for name, p in decoder.named_parameters()}
    wrapped = PeftModel.from_pretrained(decoder, str(folder))

    def undo() -> None:
        wrapped.unload()
        for name, p in decoder.named_parameters():
            p.requires_grad_(flags[name])

    return undo


# -- the base class -----------------------------------------------------------------------------------------------


def resolve_arguments(cls: type[Pruner], given: dict, stored: dict) -> dict:
    """The `__init__` arguments to build from: those given, except that an argument left at its default takes
    the stored value. A stored argument the class does not take (another version) is a ValueError."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "checkpoint") and p.kind in kinds}  # fmt: skip
    unknown = sorted(set(stored) - set(params))
    if unknown:
        raise ValueError(f"{cls.name}: the checkpoint stores argument(s) {unknown} that this version does not "
                         f"take; allowed: {sorted(params)}")
    args = {}
    for name, param in params.items():
        value = given.get(name, param.default)
        args[name] = stored[name] if name in stored and value == param.default else value
    return args


class LearnedPruner(Pruner):
    """A pruner with trained weights: saved as a checkpoint folder, loaded with `checkpoint=folder` (module
    docstring). Subclasses call `super().__init__(locals())` first and `self.ready()` last in `__init__`.

    Attributes:
        checkpoint: the folder it was loaded from (None: fresh weights).
        resolved: the arguments to build from (stored ones for those the caller left at their default).
        base_model: the stored `model_identity` checked at attach (None for fresh weights).
        adapter: the folder of the LoRA adapter added to the decoder while attached (None: no adapter).
        record: the checkpoint's training record (budgets, recipe, validation), {} for fresh weights.
    """

    def __init__(self, given: dict) -> None:
        checkpoint = given.get("checkpoint")
        meta = read_pruner_json(checkpoint) if checkpoint is not None else None
        if meta is not None and meta.get("pruner") != self.name:
            raise ValueError(f"{self.name}: checkpoint {checkpoint} holds a {meta.get('pruner')!r} pruner; build it "
                             f"with pruners.build({meta.get('pruner')!r}, checkpoint=...)")
        resolved = resolve_arguments(type(self), given, meta["arguments"] if meta else {})
        super().__init__(resolved.get("budget"))
        self.resolved = resolved
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.base_model: dict | None = meta["base_model"] if meta else None
        self.adapter: str | None = str(Path(checkpoint) / meta["adapter"]) if meta and meta.get("adapter") else None
        self.record: dict = meta.get("training", {}) if meta else {}

    def ready(self) -> None:
        """Load the checkpoint's weights into the modules `__init__` built, and switch to eval mode (training
        noise and relaxations stay off unless a trainer calls `train()`)."""
        if self.checkpoint is not None:
            path = Path(self.checkpoint) / WEIGHTS_FILE
            if not path.is_file():
                raise ValueError(f"{self.name}: checkpoint {self.checkpoint} has no {WEIGHTS_FILE}")
            try:
                self.load_state_dict(load_file(path))
            except RuntimeError as err:
                raise ValueError(f"{self.name}: the weights in {path} do not fit the pruner built from its "
                                 f"{PRUNER_FILE} arguments {self.resolved}: {err}") from err
        self.eval()

    def use_budget(self, budget: int | None) -> None:
        """The budget the next attach sets up (a trainer switches it per step; `setup` checks it on the model)."""
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"{self.name}: budget must be an int >= 1 or None, got {budget!r}")
        self._budget_arg = self.budget = budget

    def on_attach(self, model: nn.Module) -> Callable[[], None] | None:
        if self.base_model is not None:
            problems = identity_differences(self.base_model, model_identity(model))
            if problems:
                raise ValueError(
                    f"{self.name}: checkpoint {self.checkpoint} was trained on {describe_model(self.base_model)}; "
                    f"this model differs: {'; '.join(problems)}. Allowed: the model it was trained on "
                    "(or train one for this model with vtprune fit, configs/experiment/train_*.yaml)"
                )
        return apply_adapter(model, self.adapter) if self.adapter is not None else None

    def save(self, folder: str | Path, base_model: dict, **kwargs) -> Path:
        """`save_pruner(folder, self, base_model, **kwargs)`."""
        return save_pruner(folder, self, base_model, **kwargs)
