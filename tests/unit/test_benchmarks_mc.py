"""MME, ScienceQA-IMG and MMBench DataModules on tiny files in each official layout."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from benchmark_files import mmbench_rows, write_mmbench, write_mme, write_scienceqa
from PIL import Image
from torch.utils.data import DataLoader

from lightning_modules.benchmarks.mmbench import MMBenchBenchmark
from lightning_modules.benchmarks.mme import MMEBenchmark
from lightning_modules.benchmarks.scienceqa import ScienceQABenchmark

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def loaded(datamodule):
    datamodule.setup("validate")
    return datamodule.records


def items(datamodule) -> list[dict]:
    dataset = datamodule.eval_dataset()
    return [dataset[i] for i in range(len(dataset))]


def skipped_ids(caplog) -> list[str]:
    """The record ids named by the skipped-image warnings logged so far."""
    return [r.args[0] for r in caplog.records if r.levelname == "WARNING" and "sample skipped" in r.getMessage()]


def metric_class(name: str):
    """The metric class from the metrics file, or a skip while that file is not written yet."""
    module = pytest.importorskip("lightning_modules.benchmark_metrics")
    return getattr(module, name)


# ----- MME -----


@pytest.fixture
def mme(tmp_path):
    return write_mme(tmp_path / "MME_Benchmark_release_version")


def test_mme_records(mme):
    records = loaded(MMEBenchmark(str(mme), subtasks=["artwork", "code_reasoning"]))
    assert [r.id for r in records] == [
        "artwork/images/10002.jpg#0",
        "artwork/images/10002.jpg#1",
        "code_reasoning/0020.png#0",
        "code_reasoning/0020.png#1",
    ]
    # LLaVA's llava_mme.jsonl: the yes/no instruction (after one or two spaces) replaced by the short-answer line.
    assert records[0].question == "Does this artwork exist in the form of painting?" + SHORT
    assert records[1].question == "Does this artwork exist in the form of glassware?" + SHORT
    assert records[3].question == "Is a c++ code shown in the picture?" + SHORT
    assert [r.answer for r in records] == ["yes", "no", "yes", "no"]
    assert [r.task for r in records] == ["artwork", "artwork", "code_reasoning", "code_reasoning"]
    assert records[0].meta == {"image_id": "artwork/images/10002.jpg", "group": "perception"}
    assert records[2].meta == {"image_id": "code_reasoning/0020.png", "group": "cognition"}
    assert records[2].image == mme / "code_reasoning" / "0020.png"
    assert records[0].options == () and records[0].answers == ()


def test_mme_prompt_and_suffix_are_arguments(mme):
    module = MMEBenchmark(str(mme), subtasks=["code_reasoning"], prompt="Q: {question}", remove_suffix="")
    assert loaded(module)[0].question == "Q: Is a python code shown in the picture? Please answer yes or no."
    with pytest.raises(ValueError, match="question"):
        MMEBenchmark(str(mme), prompt="no field")
    with pytest.raises(ValueError, match="OCR"):
        MMEBenchmark(str(mme), subtasks=["ocr"])


def test_mme_batches_carry_images_and_skipped(mme):
    module = MMEBenchmark(str(mme), subtasks=["artwork", "code_reasoning"], batch_size=4)
    (batch,) = list(loaded(module) and module.val_dataloader())
    assert batch["skipped"] == [False] * 4
    assert batch["image"][0].size == (24, 16) and batch["image"][0].mode == "RGB"
    assert batch["meta"][2]["image_id"] == "code_reasoning/0020.png"


def test_mme_corrupt_image_is_skipped_with_its_id(mme, caplog):
    (mme / "artwork" / "images" / "10002.jpg").write_bytes(b"not a jpeg")
    module = MMEBenchmark(str(mme), subtasks=["artwork", "code_reasoning"])
    loaded(module)
    samples = items(module)
    assert skipped_ids(caplog) == ["artwork/images/10002.jpg#0", "artwork/images/10002.jpg#1"]
    assert [s["skipped"] for s in samples] == [True, True, False, False]
    assert "UnidentifiedImageError" in samples[0]["skip_reason"] and samples[2]["skip_reason"] == ""
    assert samples[0]["image"].mode == "RGB" and samples[0]["answer"] == "yes"


@pytest.mark.parametrize(
    "break_it, error, message",
    [
        (lambda root: None, FileNotFoundError, r"existence.*does not exist"),
        (lambda root: (root / "code_reasoning" / "0020.png").unlink(), FileNotFoundError, r"0020\.txt: no image 0020"),
        (
            lambda root: (root / "code_reasoning" / "0020.txt").write_text("Is it? Please answer yes or no.\tMaybe\n"),
            ValueError,
            r"0020\.txt:1: expected 'question<TAB>Yes'",
        ),
        (
            lambda root: (root / "code_reasoning" / "0020.txt").write_text("Is it? Please answer yes or no.\tYes\n"),
            ValueError,
            r"0020\.txt: expected the image's 2 questions .* found 1",
        ),
        (
            lambda root: shutil.rmtree(root / "artwork" / "questions_answers_YN"),
            FileNotFoundError,
            r"artwork has an images/ folder but no questions_answers_YN/ folder",
        ),
    ],
)
def test_mme_layout_errors_name_the_file(mme, break_it, error, message):
    break_it(mme)
    subtasks = None if error is FileNotFoundError and "existence" in message else ["artwork", "code_reasoning"]
    with pytest.raises(error, match=message):
        loaded(MMEBenchmark(str(mme), subtasks=subtasks))


def test_mme_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="MME_Benchmark_release_version"):
        loaded(MMEBenchmark(str(tmp_path / "nowhere")))


def test_mme_metric(mme):
    assert isinstance(MMEBenchmark(str(mme)).metric(), metric_class("MMEScore"))


# ----- ScienceQA-IMG -----


@pytest.fixture
def scienceqa(tmp_path):
    return write_scienceqa(tmp_path / "scienceqa")


def test_scienceqa_img_records(scienceqa):
    records = loaded(ScienceQABenchmark(str(scienceqa)))
    assert [r.id for r in records] == ["5", "11"]  # the text-only test problem and the train problem are left out
    # LLaVA's llava_test_CQM-A.json + model_vqa_science.py --single-pred-prompt.
    assert records[0].question == (
        "Context: Gordon tested a parachute.\nWhich could the test show?\nA. how steady\nB. if damaged\nC. how fast"
        + LETTER
    )
    assert records[1].question == "What is the name of the colony shown?\nA. Maryland\nB. New Hampshire" + LETTER
    assert [r.answer for r in records] == ["A", "B"]
    assert records[0].options == ("how steady", "if damaged", "how fast")
    assert [r.task for r in records] == ["natural science", "social science"]
    assert records[1].meta == {"pid": "11", "subject": "social science", "has_context": False, "grade": "grade4",
                               "category": "Colonial America", "topic": "us-history"}  # fmt: skip
    assert records[1].image == scienceqa / "images" / "test" / "11" / "image.png"
    assert loaded(ScienceQABenchmark(str(scienceqa), split="train"))[0].id == "20"


def test_scienceqa_corrupt_image_is_skipped(scienceqa, caplog):
    (scienceqa / "images" / "test" / "11" / "image.png").write_bytes(b"\x89PNG broken")
    module = ScienceQABenchmark(str(scienceqa))
    loaded(module)
    assert [s["skipped"] for s in items(module)] == [False, True]
    assert skipped_ids(caplog) == ["11"]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "break_it, error, message",
    [
        (lambda root: (root / "problems.json").unlink(), FileNotFoundError, r"problems\.json does not exist"),
        (lambda root: (root / "pid_splits.json").write_text("{"), ValueError, r"pid_splits\.json: not valid JSON"),
        (
            lambda root: edit_json(root / "pid_splits.json", lambda d: d.pop("test")),
            ValueError,
            r"pid_splits\.json: expected a list of problem ids under 'test'",
        ),
        (
            lambda root: edit_json(root / "pid_splits.json", lambda d: d["test"].append("99")),
            ValueError,
            r"problem '99' of split 'test' is not in .*problems\.json",
        ),
        (
            lambda root: edit_json(root / "problems.json", lambda d: d["5"].update(answer=3)),
            ValueError,
            r"problems\.json: problem '5': 'answer' must be the index of the right choice \(0\.\.2\)",
        ),
        (
            lambda root: edit_json(root / "problems.json", lambda d: d["5"].update(choices="A or B")),
            ValueError,
            r"problem '5': 'choices' must be a list",
        ),
        (
            lambda root: (root / "images" / "test" / "5" / "image.png").unlink(),
            FileNotFoundError,
            r"problem '5': image 'image.png' expected at .*test/5/image\.png",
        ),
    ],
)
def test_scienceqa_errors_name_the_file(scienceqa, break_it, error, message):
    break_it(scienceqa)
    with pytest.raises(error, match=message):
        loaded(ScienceQABenchmark(str(scienceqa)))


def test_scienceqa_prompt_checks():
    with pytest.raises(ValueError, match="options"):
        ScienceQABenchmark("x", prompt="{question}")
    with pytest.raises(ValueError, match="hint"):
        ScienceQABenchmark("x", context_template="Context:\n")


def test_scienceqa_metric(scienceqa):
    cls = metric_class("MultipleChoiceAccuracy")
    metric = ScienceQABenchmark(str(scienceqa)).metric()
    assert isinstance(metric, cls) and not getattr(metric, "circular", False)


# ----- MMBench -----


@pytest.fixture
def mmbench(tmp_path):
    return write_mmbench(tmp_path / "mmbench")


def test_mmbench_records(mmbench):
    records = loaded(MMBenchBenchmark(str(mmbench)))
    assert [r.id for r in records] == ["0", "1000000", "7", "9"]
    # LLaVA's model_vqa_mmbench.py --single-pred-prompt: [hint\n]question, options to the first empty one.
    assert records[0].question == "What color is the square?\nA. red\nB. blue\nC. green\nD. pink" + LETTER
    assert records[1].question == "What color is the square?\nA. blue\nB. green\nC. pink\nD. red" + LETTER
    assert records[2].question == (
        "Look at the\tsky.\nThen answer.\nWhich scene is it?\nA. beach\nB. desert\nC. forest" + LETTER
    )
    assert records[3].question == "Is it broken?\nA. yes\nB. no" + LETTER
    assert [r.answer for r in records] == ["A", "D", "C", "B"]
    assert [r.options for r in records][2:] == [("beach", "desert", "forest"), ("yes", "no")]
    assert [r.task for r in records] == ["attribute_recognition"] * 2 + ["image_scene", "image_quality"]
    assert records[1].meta == {"index": 1000000, "circular": 0, "category": "attribute_recognition",
                               "l2_category": "finegrained_perception (instance-level)"}  # fmt: skip
    assert [r.meta["circular"] for r in records] == [0, 0, 7, 9]
    assert records[0].image == mmbench / "mmbench_dev_20230712.tsv"


def test_mmbench_without_circular_reads_the_originals(mmbench):
    module = MMBenchBenchmark(str(mmbench), circular=False)
    assert [r.id for r in loaded(module)] == ["0", "7", "9"]
    assert set(module.images) == {"0", "7", "9"}


def test_mmbench_images_decode_in_memory_and_a_corrupt_one_is_skipped(mmbench, caplog, monkeypatch):
    module = MMBenchBenchmark(str(mmbench), batch_size=2)
    loaded(module)
    monkeypatch.setattr(Image.Image, "save", lambda *args, **kwargs: pytest.fail("an image was written"))
    batches = list(module.val_dataloader())
    assert [s for b in batches for s in b["skipped"]] == [False, False, False, True]
    assert skipped_ids(caplog) == ["9"] and batches[1]["skip_reason"][1].startswith("Error")  # binascii.Error
    first = batches[0]["image"][0]
    assert first.size == (6, 4) and first.getpixel((0, 0)) == (255, 0, 0)
    assert batches[1]["image"][0].getpixel((0, 0)) == (0, 0, 255)
    assert batches[1]["meta"][1]["index"] == 9


def test_mmbench_dataset_pickles_for_workers(mmbench):
    module = MMBenchBenchmark(str(mmbench), circular=False, num_workers=1, batch_size=1)
    loaded(module)
    loader = DataLoader(module.eval_dataset(), batch_size=1, num_workers=1, collate_fn=module.collate)
    assert [b["skipped"][0] for b in loader] == [False, False, True]


def test_mmbench_image_cell_with_an_index_refers_to_that_row(tmp_path):
    rows = mmbench_rows()[:3]
    rows[1]["image"] = "0"
    records = loaded(module := MMBenchBenchmark(str(write_mmbench(tmp_path, rows))))
    assert len(records) == 3 and module.images["1000000"] == module.images["0"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows[0].update(answer="E"), r"tsv:2: index 0: answer 'E' is not one of the option letters"),
        (lambda rows: rows[2].update(index="seven"), r"tsv:\d+: 'index' must be an integer, got 'seven'"),
        (lambda rows: rows[1].update(index="0"), r"duplicate index 0 \(first on line 2\)"),
        (lambda rows: rows[2].update(image=""), r"index 7 has no image"),
        (lambda rows: rows[1].update(image="5"), r"index 1000000's image refers to row 5, which has no image"),
        (lambda rows: [row.pop("answer") for row in rows], r"missing column\(s\) \['answer'\].*dev TSV"),
    ],
)
def test_mmbench_errors_name_the_file(tmp_path, change, message):
    rows = mmbench_rows()
    change(rows)
    root = write_mmbench(tmp_path, rows)
    with pytest.raises(ValueError, match=message):
        loaded(MMBenchBenchmark(str(root)))


def test_mmbench_missing_file_and_ragged_row(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mmbench_dev_20230712\.tsv does not exist"):
        loaded(MMBenchBenchmark(str(tmp_path)))
    (tmp_path / "cut.tsv").write_text("index\tquestion\tA\tB\tanswer\timage\n0\tq?\ta\tb\tA\n")
    with pytest.raises(ValueError, match=r"cut\.tsv:2: 5 tab-separated cells, expected 6"):
        loaded(MMBenchBenchmark(str(tmp_path), tsv_file="cut.tsv"))


def test_mmbench_metric(mmbench):
    cls = metric_class("MultipleChoiceAccuracy")
    circular, plain = MMBenchBenchmark(str(mmbench)).metric(), MMBenchBenchmark(str(mmbench), circular=False).metric()
    assert isinstance(circular, cls) and isinstance(plain, cls)
    if hasattr(circular, "circular"):
        assert circular.circular and not plain.circular


# ----- configs -----


@pytest.mark.parametrize(
    "name, cls, write",
    [
        ("mme", MMEBenchmark, lambda root: write_mme(root)),
        ("scienceqa", ScienceQABenchmark, lambda root: write_scienceqa(root)),
        ("mmbench", MMBenchBenchmark, lambda root: write_mmbench(root)),
    ],
)
def test_config_parses_and_builds(tmp_path, name, cls, write):
    text = (CONFIGS / "data" / f"{name}.yaml").read_text()
    assert text.startswith("# vtprune validate")
    data = yaml.safe_load(text)["data"]
    module_name, _, class_name = data["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name) is cls
    init_args = {**data["init_args"], "root": str(write(tmp_path / name))}
    if name == "mme":
        init_args["subtasks"] = ["artwork", "code_reasoning"]
    records = loaded(cls(**init_args))
    assert len(records) == (2 if name == "scienceqa" else 4)
    assert records[0].question.endswith(SHORT if name == "mme" else LETTER)


@pytest.mark.parametrize("name", ["mme", "scienceqa", "mmbench"])
def test_config_parses_in_the_cli(capsys, name):
    from lightning_modules.cli import main

    demo, config = str(CONFIGS / "experiment" / "demo.yaml"), str(CONFIGS / "data" / f"{name}.yaml")
    with pytest.raises(SystemExit) as info:
        main(["validate", "-c", demo, "-c", config, "--data.root=DIR", "--print_config"])
    assert info.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["class_path"].endswith(("MMEBenchmark", "ScienceQABenchmark", "MMBenchBenchmark"))
    assert data["init_args"]["root"] == "DIR" and "{" in data["init_args"]["prompt"]


# ----- records and batches feed the benchmark metrics -----


def scored(module, predictions: list[str]) -> dict:
    """The module's metric over its whole loader, `predictions` in record order."""
    metric_class("MultipleChoiceAccuracy")  # skip while the metrics file is not written
    loaded(module)
    metric, start = module.metric(), 0
    for batch in module.val_dataloader():
        metric.update(predictions[start : start + len(batch["id"])], batch)
        start += len(batch["id"])
    return metric.compute()


def test_mmbench_batches_score_circularly(mmbench):
    # Group 0 (two rotations) right once, wrong once; 7 right; 9 skipped (corrupt image), so not scored.
    result = scored(MMBenchBenchmark(str(mmbench), batch_size=3), ["A", "B", "The answer is C.", "B"])
    assert float(result["accuracy"]) == pytest.approx(1 / 2)  # groups: 0 wrong, 7 right
    assert float(result["question_accuracy"]) == pytest.approx(2 / 3)


def test_mme_batches_score_per_image(mme):
    module = MMEBenchmark(str(mme), subtasks=["artwork", "code_reasoning"], batch_size=3)
    result = scored(module, ["Yes", "No", "Yes", "Yes"])
    assert float(result["accuracy_by_task"]["artwork"]) == 1.0
    assert float(result["accuracy_plus_by_task"]["code_reasoning"]) == 0.0
    assert float(result["perception"]) == pytest.approx(200.0) and float(result["cognition"]) == pytest.approx(50.0)
