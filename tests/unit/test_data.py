"""The tiny LLaVA and dataset generator, the questions.jsonl reader and the benchmark DataModule."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from data.jsonl import read_questions
from data.tiny_llava import VOCAB, build_processor, write_tiny_dataset, write_tiny_llava
from lightning_modules.datamodule import JsonlBenchmark

SIZE = 112  # 8 x 8 = 64 visual tokens


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n=6, image_size=SIZE, seed=0)


def test_dataset_is_deterministic(dataset, tmp_path):
    again = write_tiny_dataset(tmp_path / "again", n=6, image_size=SIZE, seed=0)
    other = write_tiny_dataset(tmp_path / "other", n=6, image_size=SIZE, seed=1)
    assert (again / "questions.jsonl").read_text() == (dataset / "questions.jsonl").read_text()
    for path in sorted((dataset / "images").iterdir()):
        assert (again / "images" / path.name).read_bytes() == path.read_bytes()
    assert (other / "images" / "00000.png").read_bytes() != (dataset / "images" / "00000.png").read_bytes()


def test_dataset_records(dataset):
    records = read_questions(dataset)
    assert [r.id for r in records] == [f"{i:05d}" for i in range(6)]
    assert {r.task for r in records} == {"color", "shape", "count"}
    for r in records:
        assert r.image.is_file() and Image.open(r.image).size == (SIZE, SIZE)
        assert len(r.answer.split()) == 1


def test_every_dataset_word_is_in_the_vocabulary(dataset):
    tokenizer = build_processor(image_size=SIZE).tokenizer
    for r in read_questions(dataset):
        ids = tokenizer(f"{r.question} {r.answer}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, r


def test_processor_expands_the_image_token(dataset):
    processor = build_processor(image_size=SIZE)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is in the image ?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nwhat shape is in the image ? ASSISTANT:"
    image = Image.open(dataset / "images" / "00000.png")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == (SIZE // 14) ** 2
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_tiny_llava_loads_and_generates(dataset, tmp_path):
    folder = write_tiny_llava(tmp_path / "model", image_size=SIZE, seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == len(VOCAB) + 5
    again = write_tiny_llava(tmp_path / "again", image_size=SIZE, seed=0)
    reloaded = LlavaForConditionalGeneration.from_pretrained(again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    image = Image.open(dataset / "images" / "00000.png")
    inputs = processor(images=[image], text=["USER: <image>\nwhat"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3


def write_questions(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "questions.jsonl"


GOOD = json.dumps({"id": "1", "image": "a.png", "question": "q ?", "answer": "red", "task": "color"})
NO_ANSWER = json.dumps({"id": "2", "image": "a.png", "question": "q"})
NO_IMAGE = json.dumps({"id": "2", "image": "b.png", "question": "q", "answer": "a", "task": "t"})


@pytest.mark.parametrize(
    ("bad_line", "error", "message"),
    [
        ("{not json", ValueError, "not valid JSON"),
        ('["a list"]', ValueError, "expected a JSON object"),
        (NO_ANSWER, ValueError, r"missing field\(s\) \['answer', 'task'\]"),
        (NO_IMAGE, FileNotFoundError, "b.png"),
        (GOOD, ValueError, "duplicate id '1'"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, bad_line, error, message):
    path = write_questions(tmp_path, [GOOD, "", bad_line])
    with pytest.raises(error, match=message) as info:
        read_questions(tmp_path)
    assert str(path) in str(info.value)
    if "duplicate" not in message:
        assert f"{path}:3" in str(info.value)


def test_reader_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.jsonl"):
        read_questions(tmp_path)


def test_datamodule_batches_keep_images_and_text(dataset):
    dm = JsonlBenchmark(root=str(dataset), batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch) == ["answer", "answers", "id", "image", "meta", "options", "question", "task"]
    assert len(batch["image"]) == 4 and all(isinstance(im, Image.Image) for im in batch["image"])
    assert dm.tasks == ["color", "count", "shape"]
    assert len(list(dm.test_dataloader())) == 2


def test_datamodule_limit_and_seeded_shuffle(dataset):
    first = JsonlBenchmark(root=str(dataset), limit=2)
    first.setup("validate")
    assert [r.id for r in first.records] == ["00000", "00001"]
    picks = []
    for _ in range(2):
        dm = JsonlBenchmark(root=str(dataset), limit=3, shuffle_seed=7)
        dm.setup("validate")
        picks.append([r.id for r in dm.records])
    assert picks[0] == picks[1] and len(picks[0]) == 3
