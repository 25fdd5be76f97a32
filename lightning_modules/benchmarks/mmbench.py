"""`MMBenchBenchmark`: MMBench's multiple-choice questions, images base64 in the official TSV.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/mmbench.yaml --data.root=DIR

MMBench (Liu et al., "MMBench: Is Your Multi-modal Model an All-around Player?", ECCV 2024,
github.com/open-compass/MMBench). `root` holds the TSV that LLaVA-1.5's docs/Evaluation.md downloads,
`mmbench_dev_20230712.tsv` by default (`tsv_file` picks another, e.g. mmbench_dev_cn_20231003.tsv). Its
columns include index, question, hint, A, B, C, D, answer, category, image (base64), source,
l2-category and comment (those LLaVA's scripts/convert_mmbench_for_submission.py names); any column set
works as long as index, question, answer, image and A, B are there.

Circular evaluation: the TSV already holds each question's rotations (options shifted, answer letter
shifted), as rows whose index is the original's plus k * 1,000,000; index % 1,000,000 is the group,
as the official evaluation and LLaVA's answers files use it. `circular=True` (default, what
the MMBench server scores) reads every row and asks the metric to count a group only when every
rotation is right; `circular=False` reads only the original rows (index < 1,000,000).

Prompt: llava/eval/model_vqa_mmbench.py with `--single-pred-prompt` (scripts/v1_5/eval/mmbench.sh):

    <hint>                     (only when the hint is not empty)
    <question>
    A. <A>
    B. <B>
    Answer with the option's letter from the given choices directly.

A cell counts as empty as pandas.read_table (which LLaVA's script reads the TSV with) makes it NaN:
"", "nan", "None", "NA", "N/A", "NULL", ...; options stop at the first empty one, as LLaVA's get_options.

Images stay base64 text in memory and are decoded to PIL in the dataset's `__getitem__`, never
written to disk (`Base64RecordDataset`: an image that does not decode marks its sample skipped). An
image cell holding only digits refers to the image of the row with that index (later MMBench TSVs).

Records: id = str(index), image = the TSV's path (the pixels come from the TSV), answer = letter,
options = the option texts, task = category, meta {"index", "circular" (group), "category",
"l2_category"}. Metric: `MultipleChoiceAccuracy`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import sys
from pathlib import Path
from string import ascii_uppercase

from PIL import Image

from data.jsonl import Record

from . import BLANK_SIZE, FileBenchmark, SkippingRecordDataset, log
from .scienceqa import check_templates, multiple_choice_prompt

PROMPT = "{context}{question}\n{options}\nAnswer with the option's letter from the given choices directly."
CONTEXT = "{hint}\n"
ROTATION = 1_000_000  # index = original index + k * ROTATION for the k-th rotation
REQUIRED = ("index", "question", "answer", "image", "A", "B")
# pandas.read_table's default NA strings (LLaVA reads the TSV with pandas), plus LLaVA's is_none (nan/none, any case).
MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
           "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip


def is_missing(cell: str) -> bool:
    return cell in MISSING or cell.lower() in ("nan", "none")


class Base64RecordDataset(SkippingRecordDataset):
    """`SkippingRecordDataset` whose images are base64 text held in memory, by record id.

    Same items (`skipped`, `skip_reason`) and the same logged warning with the record id when an
    image does not decode; nothing is written to disk.
    """

    def __init__(self, records: list[Record], images: dict[str, str]) -> None:
        super().__init__(records)
        self.images = images

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            with Image.open(io.BytesIO(base64.b64decode(self.images[record.id]))) as image:
                rgb = image.convert("RGB")  # convert() decodes every pixel: truncated data fails here
            reason = ""
        except (OSError, SyntaxError, ValueError, binascii.Error, Image.DecompressionBombError) as err:
            reason = f"{type(err).__name__}: {err}"
            log.warning(
                "question %s: base64 image in %s could not be read (%s); sample skipped",
                record.id,
                record.image,
                reason,
            )
            rgb = Image.new("RGB", BLANK_SIZE)
        return {**dataclasses.asdict(record), "image": rgb, "skipped": bool(reason), "skip_reason": reason}


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of each row of a TSV written by pandas (quoted cells may hold newlines)."""
    # Base64 images are far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t")
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (expected a header row with {', '.join(REQUIRED)}, ...)")
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                found, expected = len(cells), len(header)
                raise ValueError(
                    f"{path}:{reader.line_num}: {found} tab-separated cells, expected {expected} as in the header"
                )
            rows.append((reader.line_num, cells))
    missing = [column for column in REQUIRED if column not in header]
    if missing:
        note = " (a test split without answers cannot be scored here: use a dev TSV)" if "answer" in missing else ""
        raise ValueError(f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED)}{note}")
    return header, rows


def row_record(path: Path, line: int, row: dict[str, str], prompt: str, context: str) -> Record:
    """One record from one row (image left to the caller); `line` names the row in errors."""
    where = f"{path}:{line}"
    try:
        index = int(row["index"])
    except ValueError:
        raise ValueError(f"{where}: 'index' must be an integer, got {row['index']!r}") from None
    options = []
    for letter in ascii_uppercase:  # the option columns A, B, ... up to the first empty one
        if letter not in row or is_missing(row[letter]):
            break
        options.append(row[letter])
    letters = ascii_uppercase[: len(options)]
    answer = row["answer"].strip()
    if len(options) < 2 or answer not in letters:
        raise ValueError(f"{where}: index {index}: answer {answer!r} is not one of the option letters {list(letters)}")
    hint = "" if is_missing(row.get("hint", "")) else row["hint"]
    category = row.get("category", "")
    category = "all" if is_missing(category) else category
    meta = {"index": index, "circular": index % ROTATION, "category": category}
    if "l2-category" in row:
        meta["l2_category"] = row["l2-category"]
    question = multiple_choice_prompt(prompt, context, row["question"], hint, options)
    return Record(str(index), path, question, answer, category, options=tuple(options), meta=meta)


def read_tsv(path: Path, prompt: str, context: str, circular: bool) -> tuple[list[Record], dict[str, str]]:
    """Records (all rows, or only the originals when not `circular`) and their base64 images by id."""
    if not path.is_file():
        raise FileNotFoundError(f"MMBench file {path} does not exist (expected the official TSV, base64 images)")
    header, rows = read_rows(path)
    records, images, lines = [], {}, {}
    for line, cells in rows:
        row = dict(zip(header, cells))
        record = row_record(path, line, row, prompt, context)
        if record.id in lines:
            raise ValueError(f"{path}:{line}: duplicate index {record.id} (first on line {lines[record.id]})")
        lines[record.id] = line
        if is_missing(row["image"]):
            raise ValueError(f"{path}:{line}: index {record.id} has no image (expected base64 text)")
        images[record.id] = row["image"]
        if circular or record.meta["index"] < ROTATION:
            records.append(record)
    for key, text in images.items():  # a digits-only cell names the row whose image it shares
        if text.isdigit() and len(text) < 32:
            if text not in images or images[text].isdigit():
                raise ValueError(f"{path}:{lines[key]}: index {key}'s image refers to row {text}, which has no image")
            images[key] = images[text]
    return records, {r.id: images[r.id] for r in records}


class MMBenchBenchmark(FileBenchmark):
    """MMBench from its TSV, with circular evaluation by default.

    Args:
        root: the folder holding the TSV.
        tsv_file: the TSV's name.
        circular: read every rotation and score circularly (True), or only the original questions.
        prompt: template with {context}, {question}, {options}; LLaVA-1.5's by default.
        context_template: what {context} becomes when the row has a hint ({hint}); "" otherwise.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    prompt_fields = ("context", "question", "options")

    def __init__(
        self,
        root: str,
        tsv_file: str = "mmbench_dev_20230712.tsv",
        circular: bool = True,
        prompt: str = PROMPT,
        context_template: str = CONTEXT,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        check_templates(prompt, context_template)
        self.tsv_file = tsv_file
        self.circular = circular
        self.context_template = context_template
        self.images: dict[str, str] = {}

    @property
    def name(self) -> str:
        return f"mmbench:{Path(self.tsv_file).stem}"

    def load_records(self) -> list[Record]:
        records, self.images = read_tsv(self.root / self.tsv_file, self.prompt, self.context_template, self.circular)
        return records

    def eval_dataset(self) -> Base64RecordDataset:
        return Base64RecordDataset(self.records, self.images)

    def metric(self):
        """Multiple-choice accuracy per category; circular: a group counts only if all its rotations are right."""
        from ..benchmark_metrics import MultipleChoiceAccuracy  # here: the metrics module is optional at import

        return MultipleChoiceAccuracy(circular=self.circular, tasks=self.metric_tasks())
