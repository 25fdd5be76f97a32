"""`vtprune` end to end: validate with every built-in pruner, pruner resolution and errors, config parsing."""

import json
from pathlib import Path

import benchmark_files
import pytest
import yaml

import pruners
from data.tiny_llava import write_tiny_dataset, write_tiny_llava
from lightning_modules.cli import main
from pruners.methods.pool import PoolPruner

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO = str(CONFIGS / "experiment" / "demo.yaml")
SIZE, BUDGET = 112, 16  # 64 visual tokens per image, pruned to 16
REQUIRED = [
    "pruner", "budget", "model", "benchmark", "accuracy", "accuracy_by_task", "visual_tokens",
    "prefill_flops", "kv_cache_bytes", "prefill_latency_ms", "num_samples",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """A config like demo.yaml over a 112-px random tiny LLaVA and four jsonl questions (one batch)."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_llava(root / "model", image_size=SIZE, seed=0)
    write_tiny_dataset(root / "data", n=4, image_size=SIZE, seed=0)
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
        "model": {"model_name_or_path": str(root / "model"), "pruner": "none", "max_new_tokens": 8},
        "data": {"class_path": "JsonlBenchmark", "init_args": {"root": str(root / "data"), "batch_size": 4}},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return str(root / "tiny.yaml")


@pytest.fixture
def demo(tiny_config, tmp_path):
    """Runs `vtprune validate -c tiny.yaml ARGS`; returns results.json as a dict."""

    def run(*args: str) -> dict:
        main(["validate", "-c", tiny_config, f"--trainer.default_root_dir={tmp_path}", *args])
        (path,) = tmp_path.rglob("results.json")
        assert (path.parent / "predictions.jsonl").is_file()
        return json.loads(path.read_text())

    return run


@pytest.mark.parametrize("name", ["none", "fastv", "pool", "random", "tome"])
def test_validate_writes_results(demo, capsys, name):
    budget = [] if name == "none" else [f"--model.pruner.budget={BUDGET}"]
    results = demo(f"--model.pruner={name}", *budget)
    assert [key for key in REQUIRED if key not in results] == []
    assert results["pruner"] == name and results["num_samples"] == 4
    assert results["visual_tokens"] == (64 if name == "none" else BUDGET)
    assert 0.0 <= results["accuracy"] <= 1.0 and set(results["accuracy_by_task"]) == {"color", "shape", "count"}
    assert "results: " in capsys.readouterr().out


def test_pruner_swapped_by_a_yaml_line(demo, tmp_path):
    swap = tmp_path / "swap.yaml"
    swap.write_text("model:\n  pruner: pool\n")
    results = demo("-c", str(swap), "--trainer.enable_progress_bar=false")  # the default rich bar steps aside
    assert results["pruner"] == "pool" and results["visual_tokens"] == 16  # pool's default: a quarter


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.pruner=fastx"], "fastx"),
        (["--model.pruner=fastv", "--model.pruner.budgt=3"], "budgt"),
    ],
)
def test_bad_pruner_stops_before_work_and_lists_what_is_allowed(demo, capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as info:
        demo(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "known pruners" in err
    assert "fastv: budget=None" in err and "random: budget=None, seed=0" in err
    assert not list(tmp_path.rglob("*.csv"))  # no run started


def test_budget_beyond_the_model_is_a_clear_error(demo, capsys):
    with pytest.raises(SystemExit):
        demo("--model.pruner=pool", "--model.pruner.budget=65")
    assert "allowed 1..64" in capsys.readouterr().err


def test_model_folder_errors(demo, capsys, tmp_path):
    with pytest.raises(SystemExit):
        demo(f"--model.model_name_or_path={tmp_path / 'missing'}")
    assert f"model folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SystemExit):
        demo(f"--model.model_name_or_path={llama}")
    err = capsys.readouterr().err
    assert str(llama) in err and "LlamaForCausalLM" in err and "LlavaForConditionalGeneration" in err


def printed_config(capsys, *configs: str, command: str = "validate") -> str:
    with pytest.raises(SystemExit) as info:
        main([command, *[arg for c in configs for arg in ("-c", c)], "--print_config"])
    assert info.value.code in (0, None)
    return capsys.readouterr().out


# configs/sweep/ holds sweep YAMLs for scripts/sweep.py, not vtprune configs (tests/integration/test_sweep.py).
VTPRUNE_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweep")


@pytest.mark.parametrize("path", VTPRUNE_CONFIGS)
def test_every_config_parses(capsys, path):
    text = (CONFIGS / path).read_text()
    assert text.startswith("# vtprune "), "each config starts with the command that runs it"
    if text.startswith("# vtprune fit"):  # training configs name their own module (or follow one that does:
        # a trainer preset is parsed after the experiment its first line names)
        named = [str(CONFIGS.parent / c) for c in text.splitlines()[0].split(" -c ")[1:]]
        printed = printed_config(capsys, *named, command="fit")
        assert str(CONFIGS / path) in named and "class_path" in yaml.safe_load(printed)["model"]
    else:
        printed = printed_config(capsys, DEMO, str(CONFIGS / path))
        assert "model_name_or_path" in printed


def test_later_configs_override_earlier_ones(capsys):
    random, fastv = str(CONFIGS / "pruner" / "random.yaml"), str(CONFIGS / "pruner" / "fastv.yaml")
    pruner = yaml.safe_load(printed_config(capsys, DEMO, random, fastv))["model"]["pruner"]
    assert pruner["class_path"] == "lightning_modules.pruner_names.fastv"
    assert pruner["init_args"]["budget"] == 64 and "seed" not in pruner["init_args"]  # random's own argument went


@pytest.mark.parametrize("config", ["train_gate.yaml", "train_tiny_llava.yaml"])
def test_a_command_line_root_dir_moves_every_path_derived_from_it(capsys, config, tmp_path):
    """Interpolation resolves after the command line: a run sent elsewhere logs, checkpoints (and resumes)
    there, not in the folder its YAML names."""
    path = str(CONFIGS / "experiment" / config)
    with pytest.raises(SystemExit):
        main(["fit", "-c", path, f"--trainer.default_root_dir={tmp_path}", "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert trainer["default_root_dir"] == str(tmp_path)
    assert trainer["logger"]["init_args"]["save_dir"] == str(tmp_path)
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"{tmp_path}/checkpoints"


class HyphenPool(PoolPruner):
    """Pool under a hyphenated name, registered only inside the test below."""

    name = "test-pool-x"


def test_hyphenated_pruner_names_resolve(demo, tmp_path, monkeypatch):
    """Registry names such as "ficoco-v" are not identifiers; the CLI still takes them, in argv and YAML."""
    monkeypatch.setitem(pruners.registry._REGISTRY, HyphenPool.name, HyphenPool)
    results = demo("--model.pruner=test-pool-x", f"--model.pruner.budget={BUDGET}")
    assert results["pruner"] == "test-pool-x" and results["visual_tokens"] == BUDGET
    for path in tmp_path.rglob("results.json"):
        path.unlink()
    swap = tmp_path / "hyphen.yaml"
    swap.write_text("model:\n  pruner:\n    class_path: test-pool-x\n    init_args:\n      budget: 4\n")
    assert demo("-c", str(swap))["visual_tokens"] == 4


# Each standard benchmark in its official layout (tests/benchmark_files.py): the folder to give as
# --data.root, a key of its own metric that results.json must hold under "metrics", and extra flags.
BENCHMARKS = {
    "vqav2": ("vqav2", None, []),
    "gqa": ("gqa", None, []),
    "textvqa": ("textvqa", None, []),
    "pope": ("pope", "f1", []),
    "mme": ("MME_Benchmark_release_version", "perception", ["--data.subtasks=[artwork,code_reasoning]"]),
    "scienceqa": ("scienceqa", None, []),
    "mmbench": ("mmbench", "question_accuracy", []),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_validate_on_each_standard_benchmark(demo, tmp_path, name):
    folder, own_metric, flags = BENCHMARKS[name]
    root = getattr(benchmark_files, f"write_{name}")(tmp_path / "release" / folder)
    results = demo("-c", str(CONFIGS / "data" / f"{name}.yaml"), f"--data.root={root}", "--data.batch_size=4", *flags)
    assert results["num_samples"] >= 2 and results["benchmark"]
    assert 0.0 <= results["accuracy"] <= 1.0 and results["accuracy_by_task"]
    if own_metric:
        assert own_metric in results["metrics"]
    assert results["num_skipped"] == (1 if name == "mmbench" else 0)  # its fixture holds one corrupt image
