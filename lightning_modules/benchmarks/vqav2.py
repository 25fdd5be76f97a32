"""VQAv2 (Goyal et al., "Making the V in VQA Matter", CVPR 2017) from the official release.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/vqav2.yaml --data.root=DIR

Layout of DIR (visualqa.org downloads; `split` = val2014 by default):

    v2_OpenEnded_mscoco_val2014_questions.json   {"questions": [{"question_id", "image_id", "question"}, ...]}
    v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "answers": [{"answer"} x 10],
                                                   "multiple_choice_answer", "answer_type", "question_type"}, ...]}
    val2014/COCO_val2014_000000xxxxxx.jpg        the COCO images (image id zero-padded to 12 digits)

File and folder names are arguments whose defaults hold `{split}`; `image_name` also `{image_id}`.
LLaVA-1.5 reports test-dev2015 through the evaluation server (its annotations are not public); here
scoring is local, so the split must have an annotations file (val2014 by default).

Records: id = question_id, answer = `multiple_choice_answer` (the most common human answer),
answers = the ten human answers, task = `answer_type` ("yes/no", "number", "other"),
meta = {"image_id", "question_type"}. Prompt: LLaVA-1.5's short-answer prompt
(docs/Evaluation.md; scripts/v1_5/eval/vqav2.sh feeds llava_vqav2_mscoco_test-dev2015.jsonl, whose
questions end with it). Metric: `VQAv2Accuracy` (normalised answers, ten-annotator rule).
"""

from __future__ import annotations

from data.jsonl import Record

from . import SHORT_ANSWER, FileBenchmark, check_images, check_unique, fill, read_json, require


class VQAv2Benchmark(FileBenchmark):
    """VQAv2 questions with their ten human answers and the COCO images.

    Args:
        root: the folder holding the files below.
        split: the COCO split name used in the default file names (val2014).
        questions_file, annotations_file, image_folder, image_name: names inside `root`; `{split}`
            and (image_name only) `{image_id}` are filled in.
        prompt: the question template; `{question}` is the question.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        split: str = "val2014",
        questions_file: str = "v2_OpenEnded_mscoco_{split}_questions.json",
        annotations_file: str = "v2_mscoco_{split}_annotations.json",
        image_folder: str = "{split}",
        image_name: str = "COCO_{split}_{image_id:012d}.jpg",
        prompt: str = SHORT_ANSWER,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        self.split = split
        self.questions_file = fill(questions_file, "questions_file", split=split)
        self.annotations_file = fill(annotations_file, "annotations_file", split=split)
        self.image_folder = fill(image_folder, "image_folder", split=split)
        fill(image_name, "image_name", split=split, image_id=0)  # a bad template stops here, not mid-load
        self.image_name = image_name

    @property
    def name(self) -> str:
        return f"vqav2:{self.split}"

    def load_records(self) -> list[Record]:
        questions_path = self.root / self.questions_file
        annotations_path = self.root / self.annotations_file
        questions = read_json(questions_path, 'the VQAv2 questions: {"questions": [{"question_id", ...}, ...]}')
        annotations = read_json(annotations_path, 'the VQAv2 annotations: {"annotations": [{"question_id", ...}]}')
        questions = require(questions, ["questions"], str(questions_path))["questions"]
        annotations = require(annotations, ["annotations"], str(annotations_path))["annotations"]
        by_id = {}
        for i, entry in enumerate(annotations):
            entry = require(entry, ["question_id", "answers", "answer_type"], f"{annotations_path}: annotation {i}")
            by_id[entry["question_id"]] = entry
        folder = self.root / self.image_folder
        records = []
        for i, question in enumerate(questions):
            question = require(question, ["question_id", "image_id", "question"], f"{questions_path}: question {i}")
            qid = question["question_id"]
            if qid not in by_id:
                raise ValueError(f"{annotations_path}: question {qid} has no annotation (it is in {questions_path})")
            records.append(self._record(question, by_id[qid], folder, annotations_path))
        check_unique([r.id for r in records], questions_path)
        return check_images(records, folder, questions_path)

    def _record(self, question: dict, annotation: dict, folder, annotations_path) -> Record:
        qid, image_id = question["question_id"], question["image_id"]
        answers = annotation["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{annotations_path}: question {qid} has no answers (expected a list of 10)")
        texts = tuple(str(require(a, ["answer"], f"{annotations_path}: question {qid}")["answer"]) for a in answers)
        try:
            image = folder / self.image_name.format(split=self.split, image_id=int(image_id))
        except (TypeError, ValueError) as err:
            raise ValueError(f"question {qid}: image_id {image_id!r} is not an integer COCO id") from err
        return Record(
            id=str(qid),
            image=image,
            question=self.prompt.format(question=question["question"]),
            answer=str(annotation.get("multiple_choice_answer", texts[0])),
            task=str(annotation["answer_type"]),
            answers=texts,
            meta={"image_id": image_id, "question_type": annotation.get("question_type", "")},
        )

    def metric(self):
        """`VQAv2Accuracy` over the answer types (imported here: the metrics module is optional at import)."""
        from ..benchmark_metrics import VQAv2Accuracy

        return VQAv2Accuracy(tasks=self.metric_tasks())
