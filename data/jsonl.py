"""Read a VQA benchmark laid out as `questions.jsonl` plus image files.

Each line of `questions.jsonl` is one record:
    {"id": "00001", "image": "images/00001.png", "question": "...", "answer": "red", "task": "color"}
`image` is relative to the folder holding `questions.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FIELDS = ("id", "image", "question", "answer", "task")


@dataclasses.dataclass(frozen=True)
class Record:
    """One question about one image.

    `answer` is the reference answer; benchmarks with more annotate the rest: `answers` (every
    annotator's answer, VQAv2 / TextVQA), `options` (multiple-choice options in order, ScienceQA /
    MMBench) and `meta` (anything a benchmark's metric needs, e.g. MME's image id, MMBench's
    circular group, POPE's setting).
    """

    id: str
    image: Path
    question: str
    answer: str
    task: str
    answers: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    meta: dict = dataclasses.field(default_factory=dict)


def parse_line(line: str, where: str, root: Path) -> Record:
    """One record from one JSON line; `where` ("file:line") names it in errors."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in FIELDS if key not in raw]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a record needs {list(FIELDS)}")
    not_text = [key for key in FIELDS if not isinstance(raw[key], str | int)]
    if not_text:
        raise ValueError(f"{where}: field(s) {not_text} must be strings")
    image = root / str(raw["image"])
    if not image.is_file():
        raise FileNotFoundError(f"{where}: image file {image} does not exist")
    return Record(str(raw["id"]), image, str(raw["question"]), str(raw["answer"]), str(raw["task"]))


def read_questions(root: str | Path, filename: str = "questions.jsonl") -> list[Record]:
    """All records of `root/filename`, in file order. Blank lines are skipped."""
    root = Path(root)
    path = root / filename
    if not path.is_file():
        raise FileNotFoundError(f"no {filename} in {root} (expected the file {path})")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                records.append(parse_line(line, f"{path}:{number}", root))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate id {duplicate!r}")
    return records
