"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023)
on COCO, from the official release.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/pope.yaml --data.root=DIR

Layout of DIR (as LLaVA-1.5's playground/data/eval/pope: `coco` from github.com/AoiDragon/POPE
output/coco, and the COCO val2014 images):

    coco/coco_pope_random.json        JSON lines: {"question_id", "image", "text", "label": "yes"|"no"}
    coco/coco_pope_popular.json       (newer releases add "image_id"; it is kept in meta when present)
    coco/coco_pope_adversarial.json
    val2014/COCO_val2014_000000xxxxxx.jpg

Records: id = "<setting>-<question_id>" (question ids restart in each file), answer = "label",
task = the setting (random, popular, adversarial), meta = {"question_id", "setting", "image_id"}.
Prompt: LLaVA-1.5's short-answer prompt (scripts/v1_5/eval/pope.sh feeds llava_pope_test.jsonl, whose
questions end with it). Metric: `POPEMetrics` (answers parsed to yes/no as LLaVA's eval_pope.py does;
accuracy, precision, recall, F1, yes-ratio per setting).
"""

from __future__ import annotations

from collections.abc import Sequence

from data.jsonl import Record

from . import SHORT_ANSWER, FileBenchmark, check_images, check_unique, fill, read_json_lines, require

SETTINGS = ("random", "popular", "adversarial")


class POPEBenchmark(FileBenchmark):
    """POPE yes/no object-existence questions over COCO val2014, one task per setting.

    Args:
        root: the folder holding the files below.
        settings: which of random, popular, adversarial to read, in this order.
        question_folder: the folder of the question files inside `root`; question_file: their name,
            `{setting}` is the setting.
        image_folder: the COCO image folder inside `root` (files named by each line's "image").
        prompt: the question template; `{question}` is the question.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        settings: Sequence[str] = SETTINGS,
        question_folder: str = "coco",
        question_file: str = "coco_pope_{setting}.json",
        image_folder: str = "val2014",
        prompt: str = SHORT_ANSWER,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        settings = list(settings)
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown or not settings or len(set(settings)) != len(settings):
            raise ValueError(f"settings must be distinct names from {list(SETTINGS)}, got {settings}")
        fill(question_file, "question_file", setting="random")
        self.settings = settings
        self.question_folder = question_folder
        self.question_file = question_file
        self.image_folder = image_folder

    @property
    def name(self) -> str:
        return "pope:coco"

    def load_records(self) -> list[Record]:
        folder = self.root / self.image_folder
        records = []
        for setting in self.settings:
            path = self.root / self.question_folder / self.question_file.format(setting=setting)
            expected = f'POPE {setting} questions, one JSON object a line: {{"question_id", "image", "text", "label"}}'
            setting_records = [
                self._record(row, setting, folder, f"{path}:{n}") for n, row in read_json_lines(path, expected)
            ]
            if not setting_records:
                raise ValueError(f"{path} holds no questions: expected {expected}")
            check_unique([r.id for r in setting_records], path)
            check_images(setting_records, folder, path)
            records += setting_records
        return records

    def _record(self, row: dict, setting: str, folder, where: str) -> Record:
        row = require(row, ["question_id", "image", "text", "label"], where)
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {row['label']!r}")
        meta = {"question_id": row["question_id"], "setting": setting}
        if "image_id" in row:
            meta["image_id"] = row["image_id"]
        return Record(
            id=f"{setting}-{row['question_id']}",
            image=folder / str(row["image"]),
            question=self.prompt.format(question=row["text"]),
            answer=label,
            task=setting,
            meta=meta,
        )

    def metric(self):
        """`POPEMetrics` per setting (imported here: the metrics module is optional at import)."""
        from ..benchmark_metrics import POPEMetrics

        return POPEMetrics(tasks=self.metric_tasks())
