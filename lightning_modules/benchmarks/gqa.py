"""GQA (Hudson & Manning, "GQA: A New Dataset for Real-World Visual Reasoning and Compositional
Question Answering", CVPR 2019) from the official release: the balanced test-dev questions.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/gqa.yaml --data.root=DIR

Layout of DIR (cs.stanford.edu/people/dorarad/gqa/download.html: questions1.2.zip and images.zip,
extracted side by side, as LLaVA-1.5's playground/data/eval/gqa/data):

    testdev_balanced_questions.json   {"<question id>": {"imageId", "question", "answer",
                                        "types": {"structural", "semantic", "detailed"}, ...}, ...}
    images/<imageId>.jpg

Records: id = the question id (the JSON key), answer = "answer", task = the question's structural
type (verify, query, choose, logical, compare; `task_type` picks "semantic", "detailed" or "all"
instead), meta = {"image_id"}. Prompt: LLaVA-1.5's short-answer prompt (docs/Evaluation.md;
scripts/v1_5/eval/gqa.sh feeds llava_gqa_testdev_balanced.jsonl, whose questions end with it).
Metric: `ExactMatchAccuracy` (LLaVA's convert_gqa_for_eval.py + GQA's eval.py score exact matches).
"""

from __future__ import annotations

from data.jsonl import Record

from . import SHORT_ANSWER, FileBenchmark, check_images, fill, read_json, require

TASK_TYPES = ("structural", "semantic", "detailed", "all")


class GQABenchmark(FileBenchmark):
    """GQA balanced questions and their images.

    Args:
        root: the folder holding the files below.
        questions_file: the balanced questions JSON inside `root` (testdev by default; e.g.
            val_balanced_questions.json for the balanced val split).
        image_folder: the image folder inside `root`; image_name: file name, `{image_id}` is "imageId".
        task_type: the per-task breakdown: a GQA question type family ("structural", "semantic",
            "detailed") or "all" (one task).
        prompt: the question template; `{question}` is the question.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        questions_file: str = "testdev_balanced_questions.json",
        image_folder: str = "images",
        image_name: str = "{image_id}.jpg",
        task_type: str = "structural",
        prompt: str = SHORT_ANSWER,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {list(TASK_TYPES)}, got {task_type!r}")
        fill(image_name, "image_name", image_id="n0")
        self.questions_file = questions_file
        self.image_folder = image_folder
        self.image_name = image_name
        self.task_type = task_type

    @property
    def name(self) -> str:
        return f"gqa:{self.questions_file.removesuffix('_questions.json')}"

    def load_records(self) -> list[Record]:
        path = self.root / self.questions_file
        questions = read_json(path, 'GQA questions: {"<question id>": {"imageId", "question", "answer", ...}}')
        if not isinstance(questions, dict):
            raise ValueError(
                f"{path}: expected a JSON object of question id -> question, got {type(questions).__name__}"
            )
        folder = self.root / self.image_folder
        fields = ["imageId", "question", "answer"] + (["types"] if self.task_type != "all" else [])
        records = []
        for qid, entry in questions.items():
            entry = require(entry, fields, f"{path}: question {qid}")
            records.append(
                Record(
                    id=str(qid),
                    image=folder / self.image_name.format(image_id=entry["imageId"]),
                    question=self.prompt.format(question=entry["question"]),
                    answer=str(entry["answer"]),
                    task=self._task(entry, qid, path),
                    meta={"image_id": str(entry["imageId"])},
                )
            )
        return check_images(records, folder, path)

    def _task(self, entry: dict, qid: str, path) -> str:
        if self.task_type == "all":
            return "all"
        types = entry["types"]
        if not isinstance(types, dict) or not types.get(self.task_type):
            raise ValueError(f"{path}: question {qid} has no {self.task_type!r} entry in 'types' (got {types!r})")
        return str(types[self.task_type])

    def metric(self):
        """`ExactMatchAccuracy` over the tasks (imported here: the metrics module is optional at import)."""
        from ..benchmark_metrics import ExactMatchAccuracy

        return ExactMatchAccuracy(tasks=self.metric_tasks())
