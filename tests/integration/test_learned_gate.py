"""The learned gate end to end on a tiny model that speaks the shapes benchmark: `vtprune fit` with the shipped
config (LoRA switched on), resume, publish, load by path and validate to the same answers; the same without LoRA through
the Python API; and the configuration errors that stop before training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import write_shapes_model

import pruners
from lightning_modules.cli import main
from lightning_modules.learned_training import PAYLOAD_KEY, LearnedPrunerTraining
from lightning_modules.module import PrunedMLLM
from lightning_modules.shapes_data import ShapesBenchmark

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "configs" / "experiment" / "train_gate.yaml")
DEMO = str(ROOT / "configs" / "experiment" / "demo.yaml")
sys.path.insert(0, str(ROOT / "scripts"))
import publish_checkpoint  # noqa: E402

VAL = 4  # val questions scored during fit and by the round trip


class Probe(pl.Callback):
    """Test helper, named by class path in the fit configs: records where fit started, the progress bar's
    metrics, and the validation answers, into FOLDER/probe-<n>.json."""

    def __init__(self, folder: str) -> None:
        self.folder, self.record = Path(folder), {}

    def on_train_start(self, trainer, module) -> None:
        self.record["start_step"] = trainer.global_step
        self.record["start_weights"] = [float(p.sum()) for p in module.pruner.parameters()]

    def on_train_end(self, trainer, module) -> None:
        self.record["bar"] = type(trainer.progress_bar_callback).__name__
        self.record["bar_metrics"] = sorted(trainer.progress_bar_callback.get_metrics(trainer, module))
        self.record["end_weights"] = [float(p.sum()) for p in module.pruner.parameters()]
        self.record["val_answers"] = module.val_answers
        n = len(list(self.folder.glob("probe-*.json")))
        (self.folder / f"probe-{n}.json").write_text(json.dumps(self.record))


def fit_config(tmp: Path, model: Path, steps: int) -> str:
    """The shipped train_gate.yaml, overridden to a tiny model, a few steps and this test's probe."""
    run = tmp / "run"
    override = {
        "trainer": {"max_steps": steps, "val_check_interval": 2, "log_every_n_steps": 1, "default_root_dir": str(run),
                    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run), "name": "logs"}},
                    "callbacks": [
                        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 1}},
                        {"class_path": "pytorch_lightning.callbacks.RichProgressBar"},
                        {"class_path": "test_learned_gate.Probe", "init_args": {"folder": str(tmp)}}]},
        # LoRA on (the shipped config has it off), so the CLI path covers the adapter too
        "model": {"init_args": {"model_name_or_path": str(model), "lr": 0.05, "warmup_steps": 1, "lora_rank": 8}},
        "data": {"init_args": {"train_size": 8, "batch_size": 2, "fit_val_size": VAL, "num_workers": 0}},
    }  # fmt: skip
    path = tmp / f"fit-{steps}.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    return write_shapes_model(tmp_path_factory.mktemp("shapes-llava"))


@pytest.fixture(scope="module")
def cli_run(shapes_model, tmp_path_factory):
    """`vtprune fit -c train_gate.yaml` for 2 steps, then again to 4 (resuming); returns (tmp, probes)."""
    tmp = tmp_path_factory.mktemp("gate-run")
    main(["fit", "-c", TRAIN, "-c", fit_config(tmp, shapes_model, 2)])
    main(["fit", "-c", TRAIN, "-c", fit_config(tmp, shapes_model, 4)])
    probes = [json.loads((tmp / f"probe-{i}.json").read_text()) for i in range(2)]
    return tmp, probes


def test_fit_shows_loss_and_throughput_and_resumes_from_the_last_checkpoint(cli_run):
    tmp, (first, second) = cli_run
    assert first["bar"] == "RichProgressBar" and {"train/loss", "train/samples_per_s"} <= set(first["bar_metrics"])
    assert first["start_step"] == 0 and first["end_weights"] != first["start_weights"]
    assert second["start_step"] == 2 and second["start_weights"] == first["end_weights"]  # resumed, not restarted
    checkpoint = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    payload = checkpoint[PAYLOAD_KEY]
    assert payload["step"] == payload["validation"]["step"] == 4
    assert sorted(payload["validation"]["rows"]) == ["128", "192", "64"]
    # Only what trains is in the checkpoint: the gate and the LoRA adapters (q and v of 4 layers, A and B).
    assert all(k.startswith("pruner.") or ".lora_" in k for k in checkpoint["state_dict"])
    assert sum(".lora_" in k for k in checkpoint["state_dict"]) == 16


def test_published_folder_round_trips_to_the_same_answers(cli_run, shapes_model, tmp_path, capsys):
    tmp, (_, run) = cli_run
    folder = publish_checkpoint.main([str(tmp / "run"), "gate-test", "--out", str(tmp_path)])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter", "model.safetensors", "pruner.json"]
    card = (folder / "README.md").read_text()
    assert "Training config (`vtprune fit`)" in card and "learned_training.LearnedPrunerTraining" in card
    assert "data seed 0" in card and "| 64 |" in card and "lora_rank: 8" in card and str(shapes_model) in card
    meta = json.loads((folder / "pruner.json").read_text())
    assert meta["pruner"] == "gate" and meta["arguments"]["budget"] == 64 and meta["adapter"] == "adapter"
    rows = meta["training"]["validation"]["rows"]
    for budget in (64, 192):
        out = tmp_path / f"validate-{budget}"
        main(["validate", "-c", DEMO, f"--model.model_name_or_path={shapes_model}", "--model.pruner=gate",
              f"--model.pruner.checkpoint={folder}", f"--model.pruner.budget={budget}", "--data=ShapesBenchmark",
              "--data.split=val", f"--data.size={VAL}", "--data.batch_size=3", f"--trainer.default_root_dir={out}",
              "--trainer.enable_progress_bar=false"])  # fmt: skip
        results = json.loads(next(out.rglob("results.json")).read_text())
        predictions = [json.loads(line)["prediction"] for line in next(out.rglob("predictions.jsonl")).open()]
        assert predictions == run["val_answers"][str(budget)]
        assert results["visual_tokens"] == budget and results["accuracy"] == rows[str(budget)]["accuracy"]
        assert results["accuracy_by_task"] == rows[str(budget)]["accuracy_by_task"]


def test_fit_without_lora_trains_the_gate_alone(shapes_model, tmp_path):
    pl.seed_everything(0)
    module = LearnedPrunerTraining(pruners.build("gate", hidden=16), model_name_or_path=str(shapes_model),
                                   budgets=[32, 96], lr=0.05, warmup_steps=1)  # fmt: skip
    frozen = {k: v.clone() for k, v in module.llava.state_dict().items()}
    gate = {k: v.clone() for k, v in module.pruner.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[pl.callbacks.ModelCheckpoint(
                             dirpath=str(tmp_path / "checkpoints"), save_last=True, save_top_k=1)])  # fmt: skip
    trainer.fit(module, datamodule=ShapesBenchmark(train_size=8, batch_size=2, fit_val_size=VAL, targets=False))
    assert module.llava.state_dict().keys() == frozen.keys()  # no adapter
    assert all(torch.equal(v, module.llava.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, module.pruner.state_dict()[k]) for k, v in gate.items())
    folder = publish_checkpoint.publish(tmp_path, "gate-plain", tmp_path / "out")
    assert not (folder / "adapter").exists()
    for budget in (32, 96):
        loaded = pruners.build("gate", checkpoint=str(folder), budget=budget)
        validate = PrunedMLLM(model_name_or_path=str(shapes_model), pruner=loaded)
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path / f"val-{budget}")).validate(
            validate, datamodule=ShapesBenchmark(split="val", size=VAL, batch_size=2))  # fmt: skip
        assert [row["prediction"] for row in validate.predictions] == module.val_answers[str(budget)]


def test_publish_refuses_a_run_without_a_learned_pruner(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit, match="not a learned-pruner run"):
        publish_checkpoint.main([str(tmp_path), "x", "--out", str(tmp_path / "out")])


def test_push_without_network_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine, network or not
    with pytest.raises(SystemExit, match="(?s)could not push .* to the hub repo 'user/gate'.*push it later"):
        publish_checkpoint.push(tmp_path, "user/gate")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, cli_run) -> Path:
    """A gate folder published for another model of the same configuration (other weights)."""
    tmp, _ = cli_run
    other = write_shapes_model(tmp_path_factory.mktemp("other-llava"), seed=1)
    folder = publish_checkpoint.main([str(tmp / "run"), "gate-other", "--out", str(tmp_path_factory.mktemp("c"))])
    meta = json.loads((folder / "pruner.json").read_text())
    meta["adapter"] = None  # continuing training needs a folder without an adapter
    (folder / "pruner.json").write_text(json.dumps(meta))
    return other, folder


@pytest.mark.parametrize(("case", "message"), [
    ("unknown", "gatex"),
    ("training-free", "pruner 'fastv' has no weights to train; learned pruners: .*gate"),
    ("budget", r"gate: budget 700 is out of range for this model: allowed 1\.\.576"),
    ("other-model", "this model differs: other weights"),
])  # fmt: skip
def test_bad_configs_stop_before_training(shapes_model, other_checkpoint, tmp_path, capsys, case, message):
    model, pruner = str(shapes_model), {"class_path": "gate"}
    budgets = [64, 128]
    if case == "unknown":
        pruner = {"class_path": "gatex"}
    elif case == "training-free":
        pruner = {"class_path": "fastv"}
    elif case == "budget":
        budgets = [64, 700]
    else:
        model = str(other_checkpoint[0])
        pruner = {"class_path": "gate", "init_args": {"checkpoint": str(other_checkpoint[1])}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"model_name_or_path": model, "pruner": pruner,
                                                              "budgets": budgets}},
                                      "trainer": {"default_root_dir": str(tmp_path / "run"),
                                                  "logger": False}}))  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", TRAIN, "-c", str(config)])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(message, err), err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_the_training_pass_is_the_inference_pass(shapes_model):
    """Prompt as a pruned prefill + answer as one decoding chunk: with a gate that keeps every token, the answer
    logits equal the unpruned model's on the whole left-padded sequence; the first equals generate's first step."""
    module = LearnedPrunerTraining(pruners.build("gate"), model_name_or_path=str(shapes_model), budgets=[576])
    data = ShapesBenchmark(split="val", size=2)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    batch["answer"] = ["red", "two"]
    prompt = module.prompt_inputs(batch["image"], batch["question"])
    answer, mask = module.answer_tokens(batch["answer"])
    with torch.no_grad():
        logits = module.answer_logits(prompt, answer)
        ids = torch.cat([prompt["input_ids"], answer], 1)
        valid = torch.cat([prompt["attention_mask"], mask.long()], 1)
        full = module.llava(input_ids=ids, attention_mask=valid, pixel_values=prompt["pixel_values"],
                            position_ids=(valid.cumsum(-1) - 1).clamp(min=0)).logits  # fmt: skip
        start = prompt["input_ids"].shape[1] - 1
        assert torch.allclose(logits[mask], full[:, start : start + answer.shape[1]][mask], atol=1e-4)
        with pruners.attach(module.llava, module.pruner):
            first = module.llava.generate(**prompt, max_new_tokens=1, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True).logits[0]  # fmt: skip
    assert torch.allclose(logits[:, 0], first, atol=1e-4)
