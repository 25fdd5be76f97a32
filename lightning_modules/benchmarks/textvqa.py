"""TextVQA (Singh et al., "Towards VQA Models That Can Read", CVPR 2019) from the official release: val 0.5.1.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/textvqa.yaml --data.root=DIR

Layout of DIR (textvqa.org/dataset; as LLaVA-1.5's playground/data/eval/textvqa):

    TextVQA_0.5.1_val.json                {"data": [{"question_id", "image_id", "question", "answers": [10]}, ...]}
    TextVQA_Rosetta_OCR_v0.2_val.json     {"data": [{"image_id", "ocr_tokens": [...]}, ...]}  (see `ocr_file`)
    train_images/<image_id>.jpg           the val images ship in train_val_images.zip's train_images/

Prompt (LLaVA-1.5, scripts/v1_5/eval/textvqa.sh): the questions of llava_textvqa_val_v051_ocr.jsonl are
"<Question>\nReference OCR token: <t1>, <t2>, ...\nAnswer the question using a single word or phrase.",
the question's first letter capitalised, the tokens TextVQA's Rosetta OCR v0.2 tokens (haotian-liu/LLaVA
issue #976); an image without OCR tokens has no OCR line (eval_textvqa.py reads both forms). That is
the default here, so scores compare with LLaVA-1.5's 58.2 and the pruning papers that reuse its file.
`ocr_file: null` asks without OCR tokens (the model must read the text from the pixels, which is
what visual-token pruning puts at risk): every question then uses `prompt`.

Records: id = question_id, answer = the most common of the ten answers (first seen wins a tie),
answers = the ten answers, task = "all", meta = {"image_id", "ocr_tokens"}. Metric: `VQAv2Accuracy`
(LLaVA's eval_textvqa.py uses m4c's TextVQAAccuracyEvaluator: the same normalisation and
ten-annotator rule as VQAv2).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from data.jsonl import Record

from . import SHORT_ANSWER, FileBenchmark, check_images, check_prompt, check_unique, fill, read_json, require

OCR_PROMPT = "{question}\nReference OCR token: {ocr_tokens}\nAnswer the question using a single word or phrase."


class TextVQABenchmark(FileBenchmark):
    """TextVQA val questions with their ten answers, optional OCR tokens and the images.

    Args:
        root: the folder holding the files below.
        questions_file: the questions-and-answers JSON inside `root`.
        ocr_file: the Rosetta OCR JSON inside `root`, or None for no OCR tokens in the prompt.
        image_folder: the image folder inside `root`; image_name: file name, `{image_id}` is "image_id".
        prompt: the template of a question without OCR tokens; `{question}` is the question.
        ocr_prompt: the template of a question whose image has OCR tokens; `{ocr_tokens}` is the
            tokens joined by ", ".
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        questions_file: str = "TextVQA_0.5.1_val.json",
        ocr_file: str | None = "TextVQA_Rosetta_OCR_v0.2_val.json",
        image_folder: str = "train_images",
        image_name: str = "{image_id}.jpg",
        prompt: str = SHORT_ANSWER,
        ocr_prompt: str = OCR_PROMPT,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        if "{ocr_tokens}" not in ocr_prompt:
            raise ValueError(f"ocr_prompt must contain '{{ocr_tokens}}', got {ocr_prompt!r}")
        self.ocr_prompt = check_prompt(ocr_prompt, ("question", "ocr_tokens"))
        fill(image_name, "image_name", image_id="0")
        self.questions_file = questions_file
        self.ocr_file = ocr_file
        self.image_folder = image_folder
        self.image_name = image_name

    @property
    def name(self) -> str:
        return "textvqa:val" + ("" if self.ocr_file else ":no-ocr")

    def load_records(self) -> list[Record]:
        path = self.root / self.questions_file
        data = read_json(path, 'the TextVQA questions: {"data": [{"question_id", "image_id", "question", ...}]}')
        data = require(data, ["data"], str(path))["data"]
        ocr = self._read_ocr() if self.ocr_file is not None else None
        folder = self.root / self.image_folder
        records = []
        for i, entry in enumerate(data):
            entry = require(entry, ["question_id", "image_id", "question", "answers"], f"{path}: question {i}")
            qid, image_id = entry["question_id"], str(entry["image_id"])
            answers = entry["answers"]
            if not isinstance(answers, list) or not answers:
                raise ValueError(f"{path}: question {qid} has no answers (expected a list of 10)")
            tokens: list[str] = []
            if ocr is not None:
                if image_id not in ocr:
                    raise ValueError(f"{self.root / self.ocr_file}: no OCR entry for image {image_id} (question {qid})")
                tokens = ocr[image_id]
            answers = tuple(str(a) for a in answers)
            records.append(
                Record(
                    id=str(qid),
                    image=folder / self.image_name.format(image_id=image_id),
                    question=self._ask(str(entry["question"]), tokens),
                    answer=Counter(answers).most_common(1)[0][0],
                    task="all",
                    answers=answers,
                    meta={"image_id": image_id, "ocr_tokens": tokens},
                )
            )
        check_unique([r.id for r in records], path)
        return check_images(records, folder, path)

    def _ask(self, question: str, tokens: list[str]) -> str:
        question = question[:1].upper() + question[1:]  # LLaVA's file capitalises TextVQA's lower-case questions
        if tokens:
            return self.ocr_prompt.format(question=question, ocr_tokens=", ".join(tokens))
        return self.prompt.format(question=question)

    def _read_ocr(self) -> dict[str, list[str]]:
        path: Path = self.root / self.ocr_file
        expected = (
            'TextVQA\'s Rosetta OCR tokens: {"data": [{"image_id", "ocr_tokens"}, ...]} '
            "(dl.fbaipublicfiles.com/textvqa/data/TextVQA_Rosetta_OCR_v0.2_val.json; LLaVA-1.5's prompt lists them). "
            "Set ocr_file: null to ask without OCR tokens"
        )
        data = require(read_json(path, expected), ["data"], str(path))["data"]
        tokens = {}
        for i, entry in enumerate(data):
            entry = require(entry, ["image_id", "ocr_tokens"], f"{path}: entry {i}")
            if not isinstance(entry["ocr_tokens"], list):
                raise ValueError(f"{path}: entry {i} ocr_tokens must be a list of strings")
            tokens[str(entry["image_id"])] = [str(t) for t in entry["ocr_tokens"]]
        return tokens

    def metric(self):
        """`VQAv2Accuracy` (imported here: the metrics module is optional at import)."""
        from ..benchmark_metrics import VQAv2Accuracy

        return VQAv2Accuracy(tasks=self.metric_tasks())
