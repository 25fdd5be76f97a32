"""Turn a finished learned-pruner run into a hub-ready checkpoint folder under checkpoints/<name>/.

    python scripts/publish_checkpoint.py runs/train_gate gate-tiny-llava-shapes          (or: make publish ARGS=...)
    python scripts/publish_checkpoint.py runs/train_gate gate-tiny-llava-shapes --push user/gate-tiny-llava-shapes

Reads the run's last checkpoint (RUN/checkpoints/last.ckpt, or --checkpoint), whose "learned_pruner" entry
(`lightning_modules.learned_training.LearnedCheckpointing`) holds the pruner's name, arguments and weights, the
LoRA adapter if one was trained, the base model's identity, the run's record and its last validation; and the
run's config.yaml (the newest under RUN, as `vtprune fit` saves it). Writes (`pruners.learned.checkpoint`):
pruner.json, model.safetensors, adapter/ (with LoRA) and README.md, a model card with the base model, the
training config, the data seed and the validation metrics table. Then

    pruners.build("gate", checkpoint="checkpoints/gate-tiny-llava-shapes")   # offline, checked at attach

loads it, and `vtprune validate ... --model.pruner=gate --model.pruner.checkpoint=...` on the same val slice
gives the same numbers. The last checkpoint must be the validated state (the training configs save one after
each validation); a checkpoint written after its last validation is refused. --push uploads the folder with
huggingface_hub (only when asked; it needs network and a token).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pruners  # noqa: E402
from pruners.learned.checkpoint import ADAPTER_DIR, describe_model, save_pruner  # noqa: E402

PAYLOAD_KEY = "learned_pruner"  # lightning_modules.learned_training.PAYLOAD_KEY (no Lightning import needed)


def find_checkpoint(run: Path, checkpoint: Path | None) -> Path:
    path = checkpoint or (run if run.suffix == ".ckpt" else run / "checkpoints" / "last.ckpt")
    if path.is_dir():
        raise SystemExit(f"{path} is a DeepSpeed checkpoint folder: convert it to one file first "
                         "(pytorch_lightning.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict) "
                         "and pass that file with --checkpoint")
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}: give the run folder (its trainer.default_root_dir, holding "
                         "checkpoints/last.ckpt) or --checkpoint FILE")
    return path


def read_payload(path: Path) -> dict:
    """The run's "learned_pruner" record, checked: a validation of exactly the weights it holds."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # the user's own run
    payload = checkpoint.get(PAYLOAD_KEY)
    if payload is None:
        raise SystemExit(f"{path} is not a learned-pruner run: no {PAYLOAD_KEY!r} entry (trained with "
                         "LearnedPrunerTraining or a module using LearnedCheckpointing?)")
    validation = payload.get("validation")
    if not validation:
        raise SystemExit(f"{path} holds no validation: validate before publishing (the card reports its metrics)")
    if validation["step"] != payload["step"]:
        raise SystemExit(f"{path} was written at step {payload['step']}, after its last validation (step "
                         f"{validation['step']}): its metrics would not be those of its weights; publish a "
                         "checkpoint written right after a validation (the training configs save one there)")
    return payload


def find_config(run: Path) -> Path | None:
    """The newest config.yaml under the run folder (`vtprune fit` saves one per run into its log folder)."""
    configs = sorted(run.rglob("config.yaml"), key=lambda p: p.stat().st_mtime) if run.is_dir() else []
    return configs[-1] if configs else None


def metrics_table(validation: dict) -> str:
    rows = validation["rows"]
    tasks = sorted({task for row in rows.values() for task in row["accuracy_by_task"]})
    lines = ["| budget | accuracy | " + " | ".join(tasks) + " | questions |", "|---" * (len(tasks) + 3) + "|"]
    for label, row in rows.items():
        by_task = " | ".join(f"{row['accuracy_by_task'][t]:.3f}" if t in row["accuracy_by_task"] else "" for t in tasks)
        lines.append(f"| {label} | {row['accuracy']:.3f} | {by_task} | {row.get('num_samples', '')} |")
    return "\n".join(lines)


def model_card(name: str, payload: dict, config_text: str | None, parameters: int) -> str:
    base, training = payload["base_model"], payload["training"]
    pruner, lora = payload["pruner"], training.get("lora")
    config = yaml.safe_load(config_text) if config_text else {}
    data = (config.get("data") or {}).get("init_args", {}) if isinstance(config, dict) else {}
    data_seed = data.get("seed", training.get("data_seed"))
    budget = payload["arguments"].get("budget")
    usage_budget = f", budget={budget}" if budget is not None else ""
    config_title = ("Training config (`vtprune fit`):" if config_text
                    else "No config.yaml was found in the run folder; the module's hyperparameters:")
    return f"""---
library_name: vtprune
tags: [vtprune, visual-token-pruning, {pruner}]
base_model: {base.get("name_or_path") or "unknown"}
---
# {name}

A trained `{pruner}` pruner for vtprune ({parameters:,} parameters{", with a LoRA adapter on the LLM" if lora else ""}).
It belongs to one model: {describe_model(base)}; vtprune refuses it on any other (checked at attach).

```python
import pruners
pruner = pruners.build("{pruner}", checkpoint="checkpoints/{name}"{usage_budget})
with pruners.attach(model, pruner) as report:   # model: the base model above
    out = model.generate(**inputs, max_new_tokens=16)
```

```bash
vtprune validate -c configs/experiment/demo.yaml --model.pruner={pruner} --model.pruner.checkpoint=checkpoints/{name}
```

## Base model

- architecture: `{base.get("architecture")}` (`{base.get("model_type")}`), folder `{base.get("name_or_path")}`
- sizes: {", ".join(f"{k}={v}" for k, v in base.get("sizes", {}).items() if v is not None)}
- config sha256: `{base.get("config_sha256")}`

## Training

- module: `{training.get("module")}`, {payload["step"]} steps; data: `{training.get("data")}`, data seed {data_seed}
- budgets: {training.get("budgets")}; LoRA: {lora or "none"}
- stored arguments: `{payload["arguments"]}`

{config_title}

```yaml
{config_text.strip() if config_text else yaml.safe_dump(training.get("hyperparameters", {}), sort_keys=False).strip()}
```

## Validation (step {payload["validation"]["step"]}, greedy answers as `vtprune validate` gives them)

{metrics_table(payload["validation"])}
"""


def publish(run: Path, name: str, out: Path, checkpoint: Path | None = None) -> Path:
    path = find_checkpoint(run, checkpoint)
    payload = read_payload(path)
    pruner = pruners.build(payload["pruner"], **payload["arguments"])
    pruner.load_state_dict(payload["state_dict"])
    folder = out / name
    if (folder / ADAPTER_DIR).is_dir():
        shutil.rmtree(folder / ADAPTER_DIR)  # a previous publish's adapter must not outlive this one
    config = find_config(run)
    config_text = config.read_text() if config else None
    training = {**payload["training"], "source": str(path), "config": config_text}
    save_pruner(folder, pruner, payload["base_model"], arguments=payload["arguments"], adapter=payload["adapter"],
                training={**training, "validation": payload["validation"]})
    parameters = sum(p.numel() for p in pruner.parameters())
    (folder / "README.md").write_text(model_card(name, payload, config_text, parameters))
    return folder


def push(folder: Path, repo_id: str) -> str:
    """Upload `folder` to the hub model repo `repo_id` (created if missing); SystemExit with the reason otherwise."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=f"vtprune: publish {folder.name}")  # fmt: skip
    except Exception as err:  # network, token, offline mode: all end the same way
        raise SystemExit(f"could not push {folder} to the hub repo {repo_id!r}: {type(err).__name__}: {err}\n"
                         f"The folder is complete; push it later with --push once network and a token "
                         f"(huggingface-cli login) are available.") from err
    return str(getattr(info, "commit_url", repo_id))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (trainer.default_root_dir) or a .ckpt file")
    parser.add_argument("name", help="the checkpoint's name: the folder checkpoints/<name>")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file other than last.ckpt")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints", help="where <name>/ goes")
    parser.add_argument("--push", metavar="REPO_ID", default=None, help="also upload to this hub model repo")
    args = parser.parse_args(argv)
    folder = publish(args.run, args.name, args.out, args.checkpoint)
    print(f"published: {folder}")
    if args.push:
        print(f"pushed: {push(folder, args.push)}")
    return folder


if __name__ == "__main__":
    main()
