"""VQAv2, GQA, TextVQA and POPE DataModules on tiny copies of each official release layout."""

import inspect
import json
import logging
from pathlib import Path

import pytest
import yaml
from benchmark_files import (
    VQA_ANSWERS,
    write_gqa,
    write_pope,
    write_textvqa,
    write_vqav2,
)
from PIL import Image

from lightning_modules.benchmarks import SkippingRecordDataset
from lightning_modules.benchmarks.gqa import GQABenchmark
from lightning_modules.benchmarks.pope import POPEBenchmark
from lightning_modules.benchmarks.textvqa import TextVQABenchmark
from lightning_modules.benchmarks.vqav2 import VQAv2Benchmark

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
SUFFIX = "\nAnswer the question using a single word or phrase."


def loaded(datamodule):
    datamodule.setup("validate")
    return datamodule.records


# ----- VQAv2 -----


@pytest.fixture
def vqav2(tmp_path):
    return write_vqav2(tmp_path)


def test_vqav2_records(vqav2):
    records = loaded(VQAv2Benchmark(str(vqav2)))
    assert [r.id for r in records] == ["1001", "1002", "2001"]
    assert records[0].question == "Is the man happy?" + SUFFIX
    assert records[0].image == vqav2 / "val2014" / "COCO_val2014_000000000042.jpg"
    assert records[2].image.name == "COCO_val2014_000000393267.jpg"
    for r, (answers, mc, atype, _) in zip(records, VQA_ANSWERS.values()):
        assert r.answers == tuple(answers) and len(r.answers) == 10
        assert (r.answer, r.task) == (mc, atype)
    assert records[1].meta == {"image_id": 42, "question_type": "how many"}


def test_vqav2_names_and_prompt_are_arguments(vqav2):
    (vqav2 / "val2014").rename(vqav2 / "coco")
    (vqav2 / "v2_mscoco_val2014_annotations.json").rename(vqav2 / "answers.json")
    dm = VQAv2Benchmark(str(vqav2), annotations_file="answers.json", image_folder="coco", prompt="Q: {question} A:")
    records = loaded(dm)
    assert records[0].question == "Q: Is the man happy? A:" and records[0].image.parent.name == "coco"


def test_vqav2_missing_annotation(vqav2):
    path = vqav2 / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["question_id"] != 1002]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations\.json: question 1002 has no annotation"):
        VQAv2Benchmark(str(vqav2)).load_records()


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("v2_OpenEnded_mscoco_val2014_questions.json", None, FileNotFoundError, "questions.json does not exist"),
        ("v2_mscoco_val2014_annotations.json", "{not json", ValueError, "annotations.json: not valid JSON"),
        ("v2_OpenEnded_mscoco_val2014_questions.json", '{"data": []}', ValueError,
         r"missing field\(s\) \['questions'\]"),
        ("v2_OpenEnded_mscoco_val2014_questions.json", '{"questions": [{"question_id": 5}]}', ValueError,
         r"question 0: missing field\(s\) \['image_id', 'question'\]"),
    ],
)  # fmt: skip
def test_vqav2_malformed_files(vqav2, name, content, error, match):
    path = vqav2 / name
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(error, match=match):
        VQAv2Benchmark(str(vqav2)).load_records()


def test_vqav2_missing_image(vqav2):
    (vqav2 / "val2014" / "COCO_val2014_000000393267.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 of the 3 images .* COCO_val2014_000000393267\.jpg \(question 2001\)"
    ):
        VQAv2Benchmark(str(vqav2)).load_records()


# ----- GQA -----


@pytest.fixture
def gqa(tmp_path):
    return write_gqa(tmp_path)


def test_gqa_records(gqa):
    records = loaded(GQABenchmark(str(gqa)))
    assert [r.id for r in records] == ["20968379", "20968380", "201640614"]
    assert [r.answer for r in records] == ["yes", "cup", "dog"]
    assert [r.task for r in records] == ["verify", "query", "choose"]
    assert records[1].question == "What is on the table?" + SUFFIX
    assert records[2].image == gqa / "images" / "n161313.jpg" and records[2].meta == {"image_id": "n161313"}
    assert [r.task for r in loaded(GQABenchmark(str(gqa), task_type="semantic"))] == ["attr", "rel", "attr"]
    assert {r.task for r in loaded(GQABenchmark(str(gqa), task_type="all"))} == {"all"}


def test_gqa_errors(gqa):
    with pytest.raises(ValueError, match="task_type must be one of"):
        GQABenchmark(str(gqa), task_type="global")
    path = gqa / "testdev_balanced_questions.json"
    data = json.loads(path.read_text())
    del data["20968380"]["answer"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"question 20968380: missing field\(s\) \['answer'\]"):
        GQABenchmark(str(gqa)).load_records()
    path.write_text(json.dumps(list(data.values())))
    with pytest.raises(ValueError, match="expected a JSON object of question id -> question, got list"):
        GQABenchmark(str(gqa)).load_records()
    with pytest.raises(FileNotFoundError, match="val_balanced_questions.json does not exist: expected GQA questions"):
        GQABenchmark(str(gqa), questions_file="val_balanced_questions.json").load_records()


# ----- TextVQA -----


@pytest.fixture
def textvqa(tmp_path):
    return write_textvqa(tmp_path)


def test_textvqa_records_with_ocr_tokens(textvqa):
    records = loaded(TextVQABenchmark(str(textvqa)))
    assert [r.id for r in records] == ["34602", "34603", "34604"]
    # LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl form; no OCR line when the image has no tokens.
    assert records[0].question == (
        "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use" + SUFFIX
    )
    assert records[2].question == "What kind of beer is this?" + SUFFIX
    assert records[0].answers == ("dakota",) * 7 + ("nikon",) * 3 and records[0].answer == "dakota"
    assert records[2].answer == "ale"  # a tie goes to the answer seen first
    assert {r.task for r in records} == {"all"}
    assert records[2].image == textvqa / "train_images" / "b9dc400eb20bad64.jpg"
    assert records[0].meta == {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use"]}


def test_textvqa_without_ocr(textvqa):
    (textvqa / "TextVQA_Rosetta_OCR_v0.2_val.json").unlink()
    with pytest.raises(FileNotFoundError, match="Rosetta OCR tokens.*ocr_file: null"):
        TextVQABenchmark(str(textvqa)).load_records()
    records = loaded(TextVQABenchmark(str(textvqa), ocr_file=None))
    assert records[0].question == "What is the brand of this camera?" + SUFFIX


def test_textvqa_errors(textvqa):
    with pytest.raises(ValueError, match="ocr_prompt must contain"):
        TextVQABenchmark(str(textvqa), ocr_prompt="{question}")
    ocr = textvqa / "TextVQA_Rosetta_OCR_v0.2_val.json"
    ocr.write_text(json.dumps({"data": [{"image_id": "003a8ae2ef43b901", "ocr_tokens": []}]}))
    with pytest.raises(ValueError, match=r"no OCR entry for image b9dc400eb20bad64 \(question 34604\)"):
        TextVQABenchmark(str(textvqa)).load_records()
    path = textvqa / "TextVQA_0.5.1_val.json"
    data = json.loads(path.read_text())
    data["data"][1]["answers"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="question 34603 has no answers"):
        TextVQABenchmark(str(textvqa), ocr_file=None).load_records()
    data["data"][1]["question_id"] = 34602
    data["data"][1]["answers"] = ["x"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="duplicate question id '34602'"):
        TextVQABenchmark(str(textvqa), ocr_file=None).load_records()


# ----- POPE -----


@pytest.fixture
def pope(tmp_path):
    return write_pope(tmp_path)


def test_pope_records(pope):
    records = loaded(POPEBenchmark(str(pope)))
    assert [r.id for r in records] == [
        "random-1", "random-2", "popular-1", "popular-2", "adversarial-0", "adversarial-1",
    ]  # fmt: skip
    assert [r.task for r in records] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    assert [r.answer for r in records] == ["yes", "no"] * 3
    assert records[0].question == "Is there a snowboard in the image?" + SUFFIX
    assert records[0].image == pope / "val2014" / "COCO_val2014_000000310196.jpg"
    assert records[0].meta == {"question_id": 1, "setting": "random"}
    assert records[5].meta == {"question_id": 1, "setting": "adversarial", "image_id": 548882}
    assert [r.task for r in loaded(POPEBenchmark(str(pope), settings=["adversarial"]))] == ["adversarial"] * 2


def test_pope_errors(pope):
    with pytest.raises(ValueError, match="settings must be distinct names from"):
        POPEBenchmark(str(pope), settings=["random", "hard"])
    path = pope / "coco" / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1].replace('"no"', '"maybe"') + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:2: label must be 'yes' or 'no', got 'maybe'"):
        POPEBenchmark(str(pope)).load_records()
    path.write_text(lines[0] + "\n{broken\n")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:2: not valid JSON"):
        POPEBenchmark(str(pope)).load_records()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"coco_pope_popular\.json does not exist: expected POPE popular"):
        POPEBenchmark(str(pope)).load_records()


# ----- shared: prompts, corrupt images, configs, metrics -----


@pytest.mark.parametrize("cls", [VQAv2Benchmark, GQABenchmark, TextVQABenchmark, POPEBenchmark])
def test_prompt_must_hold_the_question(tmp_path, cls):
    with pytest.raises(ValueError, match="prompt must contain '{question}'"):
        cls(str(tmp_path), prompt="Answer briefly.")
    with pytest.raises(ValueError, match="may use {question}"):
        cls(str(tmp_path), prompt="{question} {answer}")


def test_corrupt_image_is_skipped_and_reported(pope, caplog):
    (pope / "val2014" / "COCO_val2014_000000548882.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    dm = POPEBenchmark(str(pope), settings=["random", "adversarial"], batch_size=4)
    dm.setup("validate")
    assert isinstance(dm.eval_dataset(), SkippingRecordDataset)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.val_dataloader())
    batch = {key: sum((b[key] for b in batches), []) for key in batches[0]}
    assert batch["skipped"] == [False, False, True, True]
    assert batch["skip_reason"][0] == "" and "UnidentifiedImageError" in batch["skip_reason"][2]
    assert all(img.mode == "RGB" for img in batch["image"])
    assert batch["image"][0].size == (24, 16)
    assert "question adversarial-0" in caplog.text and "COCO_val2014_000000548882.jpg" in caplog.text


def test_truncated_image_is_skipped(gqa):
    path = gqa / "images" / "n161313.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    dm = GQABenchmark(str(gqa))
    dm.setup("validate")
    items = [dm.eval_dataset()[i] for i in range(3)]
    assert [item["skipped"] for item in items] == [False, False, True]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("vqav2", VQAv2Benchmark), ("gqa", GQABenchmark), ("textvqa", TextVQABenchmark), ("pope", POPEBenchmark)],
)
def test_configs_name_the_class_with_its_defaults(name, cls):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith("# vtprune validate ")
    config = yaml.safe_load(text)["data"]
    assert config["class_path"] == f"{cls.__module__}.{cls.__name__}"
    defaults = inspect.signature(cls).parameters
    for key, value in config["init_args"].items():
        if key not in ("root", "batch_size", "num_workers"):
            default = defaults[key].default
            assert value == (list(default) if isinstance(default, tuple) else default), key
    cls(**config["init_args"])


@pytest.mark.parametrize(
    ("fixture", "cls", "metric"),
    [
        ("vqav2", VQAv2Benchmark, "VQAv2Accuracy"),
        ("gqa", GQABenchmark, "ExactMatchAccuracy"),
        ("textvqa", TextVQABenchmark, "VQAv2Accuracy"),
        ("pope", POPEBenchmark, "POPEMetrics"),
    ],
)
def test_metric(request, fixture, cls, metric):
    """The benchmark's metric scores its own batches: the reference answers score 1, a wrong answer 0."""
    metrics = pytest.importorskip("lightning_modules.benchmark_metrics")
    dm = cls(str(request.getfixturevalue(fixture)), batch_size=2)
    dm.setup("validate")
    assert type(dm.metric()) is getattr(metrics, metric)
    right, wrong = dm.metric(), dm.metric()
    for batch in dm.val_dataloader():
        right.update(batch["answer"], batch)
        wrong.update(["no" if a == "yes" else "yes" if a == "no" else "zebra" for a in batch["answer"]], batch)
    assert float(right.compute()["accuracy"]) == 1.0 and float(wrong.compute()["accuracy"]) == 0.0
    assert set(right.compute()["accuracy_by_task"]) == set(dm.tasks)
    assert int(right.compute()["total"]) == len(dm.records)


def test_metric_leaves_out_skipped_samples(pope):
    pytest.importorskip("lightning_modules.benchmark_metrics")
    (pope / "val2014" / "COCO_val2014_000000548882.jpg").write_bytes(b"broken")
    dm = POPEBenchmark(str(pope), batch_size=6)
    dm.setup("validate")
    metric = dm.metric()
    for batch in dm.val_dataloader():
        metric.update(batch["answer"], batch)
    assert int(metric.compute()["total"]) == 4 and set(metric.compute()["accuracy_by_task"]) == {"random", "popular"}
