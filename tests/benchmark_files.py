"""Tiny copies of the standard benchmarks' official release layouts, written by the tests.

`write_<name>(root)` writes a few questions and generated images under `root` (a folder that need not
exist) and returns the folder to give as `--data.root`.
"""

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def image(path: Path, color=(200, 30, 30), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


VQA_ANSWERS = {
    1001: (["yes"] * 10, "yes", "yes/no", "is the"),
    1002: (["2"] * 6 + ["two"] * 3 + ["3"], "2", "number", "how many"),
    2001: (["red"] * 4 + ["dark red"] * 4 + ["maroon"] * 2, "red", "other", "what color"),
}


def write_vqav2(root: Path) -> Path:
    questions = [
        {"image_id": 42, "question": "Is the man happy?", "question_id": 1001},
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 1002},
        {"image_id": 393267, "question": "What color is the bus?", "question_id": 2001},
    ]
    annotations = [
        {
            "question_type": qtype,
            "multiple_choice_answer": mc,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
            "image_id": 42 if qid < 2000 else 393267,
            "answer_type": atype,
            "question_id": qid,
        }
        for qid, (answers, mc, atype, qtype) in VQA_ANSWERS.items()
    ]
    info = {"info": {}, "license": {}, "data_subtype": "val2014"}
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {**info, "questions": questions})
    write_json(root / "v2_mscoco_val2014_annotations.json", {**info, "annotations": annotations})
    image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    image(root / "val2014" / "COCO_val2014_000000393267.jpg")
    return root


def write_gqa(root: Path) -> Path:
    def question(image_id, text, answer, structural, semantic):
        return {
            "semantic": [], "entailed": [], "equivalent": [], "question": text, "imageId": image_id,
            "isBalanced": True, "groups": {"global": None, "local": "10c-cat"}, "answer": answer,
            "semanticStr": "...", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"detailed": f"{semantic}Detail", "semantic": semantic, "structural": structural},
            "fullAnswer": f"The answer is {answer}.",
        }  # fmt: skip

    questions = {
        "20968379": question("n288870", "Is the sky dark?", "yes", "verify", "attr"),
        "20968380": question("n288870", "What is on the table?", "cup", "query", "rel"),
        "201640614": question("n161313", "Which is bigger, the cat or the dog?", "dog", "choose", "attr"),
    }
    write_json(root / "testdev_balanced_questions.json", questions)
    image(root / "images" / "n288870.jpg")
    image(root / "images" / "n161313.jpg")
    return root


def write_textvqa(root: Path) -> Path:
    def question(qid, image_id, text, answers):
        return {
            "question": text, "image_id": image_id, "image_classes": ["Camera"], "flickr_original_url": "",
            "flickr_300k_url": "", "image_width": 1024, "image_height": 768, "answers": answers,
            "question_tokens": text.split(), "question_id": qid, "set_name": "val",
        }  # fmt: skip

    data = [
        question(34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 7 + ["nikon"] * 3),
        question(34603, "003a8ae2ef43b901", "what does the small white text spell?", ["copenhagen"] * 10),
        question(34604, "b9dc400eb20bad64", "what kind of beer is this?", ["ale"] * 5 + ["stone"] * 5),
    ]
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    ocr = [
        {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use"], "ocr_info": []},
        {"image_id": "b9dc400eb20bad64", "ocr_tokens": [], "ocr_info": []},
    ]
    write_json(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"dataset_type": "val", "data": ocr})
    image(root / "train_images" / "003a8ae2ef43b901.jpg")
    image(root / "train_images" / "b9dc400eb20bad64.jpg")
    return root


POPE_LINES = {
    "random": [(1, 310196, "snowboard", "yes"), (2, 310196, "toaster", "no")],
    "popular": [(1, 310196, "snowboard", "yes"), (2, 310196, "person", "no")],
    "adversarial": [(0, 548882, "dining table", "yes"), (1, 548882, "chair", "no")],
}


def write_pope(root: Path) -> Path:
    for setting, lines in POPE_LINES.items():
        rows = [
            {"question_id": qid, "image": f"COCO_val2014_{image_id:012d}.jpg", "image_id": image_id,
             "text": f"Is there a {thing} in the image?", "label": label}
            for qid, image_id, thing, label in lines
        ]  # fmt: skip
        if setting == "random":  # the older release has no image_id
            rows = [{k: v for k, v in row.items() if k != "image_id"} for row in rows]
        (root / "coco").mkdir(parents=True, exist_ok=True)
        (root / "coco" / f"coco_pope_{setting}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    image(root / "val2014" / "COCO_val2014_000000310196.jpg")
    image(root / "val2014" / "COCO_val2014_000000548882.jpg")
    return root


def write_mme(root: Path) -> Path:
    """Two subtasks, one in each release layout, two questions per image."""
    image(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware?  Please answer yes or no.\tNo\n"
    )
    image(root / "code_reasoning" / "0020.png", (0, 0, 255))
    (root / "code_reasoning" / "0020.txt").write_text(
        "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n\n"
    )
    return root


def write_scienceqa(root: Path) -> Path:
    problems = {
        "5": {"question": "Which could the test show?", "choices": ["how steady", "if damaged", "how fast"],
              "answer": 0, "hint": "Gordon tested a parachute.", "image": "image.png", "split": "test",
              "subject": "natural science", "grade": "grade7", "category": "Engineering", "topic": "science"},
        "11": {"question": "What is the name of the colony shown?", "choices": ["Maryland", "New Hampshire"],
               "answer": 1, "hint": "", "image": "image.png", "split": "test", "subject": "social science",
               "grade": "grade4", "category": "Colonial America", "topic": "us-history"},
        "15": {"question": "Would you find the word dozen?", "choices": ["no", "yes"], "answer": 0, "hint": "",
               "image": None, "split": "test", "subject": "language science"},
        "20": {"question": "Train question?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": "image.png",
               "split": "train", "subject": "natural science"},
    }  # fmt: skip
    root.mkdir(parents=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["20"], "val": [], "test": ["5", "11", "15"]}))
    image(root / "images" / "test" / "5" / "image.png")
    image(root / "images" / "test" / "11" / "image.png", (0, 255, 0))
    image(root / "images" / "train" / "20" / "image.png")
    return root


def b64_png(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]  # fmt: skip


def mmbench_rows() -> list[dict]:
    red, blue = b64_png((255, 0, 0)), b64_png((0, 0, 255))
    common = {"source": "MMBench", "comment": "nan", "split": "dev"}
    return [
        {**common, "index": "0", "question": "What color is the square?", "hint": "nan", "A": "red", "B": "blue",
         "C": "green", "D": "pink", "answer": "A", "category": "attribute_recognition", "image": red,
         "l2-category": "finegrained_perception (instance-level)"},
        {**common, "index": "1000000", "question": "What color is the square?", "hint": "nan", "A": "blue",
         "B": "green", "C": "pink", "D": "red", "answer": "D", "category": "attribute_recognition", "image": red,
         "l2-category": "finegrained_perception (instance-level)"},
        {**common, "index": "7", "question": "Which scene is it?", "hint": "Look at the\tsky.\nThen answer.",
         "A": "beach", "B": "desert", "C": "forest", "D": "", "answer": "C", "category": "image_scene",
         "image": blue, "l2-category": "coarse_perception"},
        {**common, "index": "9", "question": "Is it broken?", "hint": "", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "B", "category": "image_quality", "image": "!!not base64", "l2-category": "coarse_perception"},
    ]  # fmt: skip


def write_mmbench(root: Path, rows: list[dict] | None = None, name: str = "mmbench_dev_20230712.tsv") -> Path:
    """The TSV as pandas' to_csv(sep="\\t") writes it: cells with tabs or newlines quoted."""
    root.mkdir(parents=True, exist_ok=True)
    rows = mmbench_rows() if rows is None else rows
    columns = [c for c in COLUMNS if c in rows[0]]
    with (root / name).open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[row[c] for c in columns] for row in rows])
    return root
