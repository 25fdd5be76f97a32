"""The standard multimodal benchmarks as `BenchmarkDataModule`s, read from their official releases on disk.

One module per benchmark (vqav2, gqa, textvqa, pope, mme, scienceqa, mmbench); each takes the folder
that holds the release with `--data.root=DIR` and names the files inside as the release does (every
name is a constructor argument, so a differently arranged copy works too). Each module's docstring
shows the layout it reads and where its prompt comes from (LLaVA-1.5's evaluation prompts).

Records carry the prompt already formatted (`Record.question`), so the model module needs no
benchmark-specific code, and `metric()` gives the benchmark's own metric.

This file holds what the file-based benchmarks share: JSON readers whose errors name the file and
what was expected, the prompt check, the image-existence check, and `SkippingRecordDataset`, which
reports a corrupt image with its record id and marks the sample skipped instead of stopping a run.
It imports no benchmark module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from data.jsonl import Record

from ..datamodule import BenchmarkDataModule, RecordDataset

log = logging.getLogger(__name__)

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."  # LLaVA-1.5, docs/Evaluation.md
BLANK_SIZE = (336, 336)  # the image a skipped sample carries: LLaVA-1.5's input size, so any processor takes it


def read_json(path: Path, expected: str):
    """The parsed JSON file at `path`; `expected` says what the file should be, for the error messages."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {expected}")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); expected {expected}") from err


def read_json_lines(path: Path, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of the JSON-lines file at `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {expected}")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected {expected}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def require(entry: object, keys: Iterable[str], where: str) -> dict:
    """`entry` if it is a dict holding every key in `keys`; else a ValueError naming `where` and the missing keys."""
    keys = list(keys)
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object with {keys}, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; expected {keys}")
    return entry


def check_prompt(prompt: str, fields: tuple[str, ...] = ("question",)) -> str:
    """`prompt` if it holds `{question}` and no placeholder other than `fields`; else a ValueError."""
    if "{question}" not in prompt:
        raise ValueError(f"prompt must contain '{{question}}', got {prompt!r}")
    try:
        prompt.format(**{field: "" for field in fields})
    except (KeyError, IndexError, ValueError) as err:
        allowed = ", ".join(f"{{{field}}}" for field in fields)
        raise ValueError(f"prompt {prompt!r} is not a valid template ({err!r}); it may use {allowed}") from err
    return prompt


def fill(template: str, argument: str, **values) -> str:
    """`template.format(**values)`; a ValueError naming `argument` and the allowed placeholders if that fails."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        allowed = ", ".join(f"{{{key}}}" for key in values)
        raise ValueError(
            f"{argument} {template!r} is not a valid name template ({err!r}); it may use {allowed}"
        ) from err


def check_images(records: list[Record], folder: Path, source: Path) -> list[Record]:
    """`records` if every image exists; else a FileNotFoundError with the count and the first few missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist: expected the images named by {source}")
    missing = [r for r in records if not r.image.is_file()]
    if missing:
        examples = ", ".join(f"{r.image.name} (question {r.id})" for r in missing[:3])
        raise FileNotFoundError(
            f"{folder}: {len(missing)} of the {len(records)} images named by {source.name} do not exist, "
            f"e.g. {examples}"
        )
    return records


def check_unique(ids: list[str], source: Path) -> None:
    """A ValueError naming the first id that appears twice."""
    seen: set[str] = set()
    for record_id in ids:
        if record_id in seen:
            raise ValueError(f"{source}: duplicate question id {record_id!r}")
        seen.add(record_id)


class SkippingRecordDataset(RecordDataset):
    """`RecordDataset` that survives a corrupt image.

    Every item has `skipped` (bool) and `skip_reason` (str, empty unless skipped). An image that
    cannot be opened or decoded is logged as a warning with the record id and path, and the item
    carries a black `BLANK_SIZE` image with `skipped=True`, so the batch still collates and the run
    goes on; the model module leaves skipped items out of the metric and counts them.
    """

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            with Image.open(record.image) as image:
                rgb = image.convert("RGB")  # convert() decodes the whole file: truncated data fails here
            reason = ""
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = f"{type(err).__name__}: {err}"
            log.warning("question %s: image %s could not be read (%s); sample skipped", record.id, record.image, reason)
            rgb = Image.new("RGB", BLANK_SIZE)
        return {**dataclasses.asdict(record), "image": rgb, "skipped": bool(reason), "skip_reason": reason}


class FileBenchmark(BenchmarkDataModule):
    """Base of the benchmarks read from a folder: `root`, the prompt, the corrupt-image-tolerant dataset.

    Subclasses list their own constructor arguments (the CLI reads the signature) and call
    `super().__init__`, then implement `load_records` and `metric`.
    """

    prompt_fields: tuple[str, ...] = ("question",)

    def __init__(
        self,
        root: str,
        prompt: str,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, limit=limit, shuffle_seed=shuffle_seed)
        self.root = Path(root)
        self.prompt = check_prompt(prompt, self.prompt_fields)

    def eval_dataset(self) -> SkippingRecordDataset:
        return SkippingRecordDataset(self.records)

    def metric_tasks(self) -> list[str]:
        """Task names for the metric: the loaded records' tasks (empty before `setup`)."""
        return self.tasks if self.records is not None else []
