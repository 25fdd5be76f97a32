"""`MMEBenchmark`: MME's yes/no questions, read from the official release folder.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/mme.yaml --data.root=DIR

MME (Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models",
arXiv:2306.13394). `root` is the release folder `MME_Benchmark_release_version` (LLaVA-1.5's
docs/Evaluation.md puts it under playground/data/eval/MME), one folder per subtask, in one of two layouts:

    <root>/artwork/images/10002.jpg   + <root>/artwork/questions_answers_YN/10002.txt
    <root>/code_reasoning/0020.png    + <root>/code_reasoning/0020.txt

A subtask folder with an `images/` folder uses the first (artwork, celebrity, landmark, posters, scene
in the release), otherwise images and question files lie side by side: the rule LLaVA's
playground/data/eval/MME/convert_answer_to_mme.py applies. Each `<name>.txt` holds the two questions
about image `<name>`, one a line: `question<TAB>Yes` or `question<TAB>No`.

Prompt: LLaVA-1.5's playground/data/eval/MME/llava_mme.jsonl drops the question's trailing
"Please answer yes or no." and appends "\\nAnswer the question using a single word or phrase."; both are
arguments (`remove_suffix`, `prompt`).

Records: id `<image_id>#<0|1>`, answer "yes"/"no" (lowercased), task = subtask folder name,
meta {"image_id": image path relative to root (LLaVA's question_id), "group": "perception"/"cognition"}.
An unreadable image does not stop a run: `SkippingRecordDataset` marks the sample skipped.
Metric: `MMEScore` (acc and acc+ per subtask, perception and cognition scores).
"""

from __future__ import annotations

from pathlib import Path

from data.jsonl import Record

from . import SHORT_ANSWER, FileBenchmark

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION  # the order of the official eval_tool/calculation.py
YES_NO_SUFFIX = "Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
QUESTIONS_PER_IMAGE = 2  # MME scores accuracy+ over each image's pair


# ----- the MME release layout -----


def question_files(folder: Path, images_dir: str, questions_dir: str) -> list[tuple[Path, Path]]:
    """(question file, image) pairs of one subtask folder, by file name."""
    if (folder / images_dir).is_dir():
        image_folder, text_folder = folder / images_dir, folder / questions_dir
        if not text_folder.is_dir():
            raise FileNotFoundError(
                f"{folder} has an {images_dir}/ folder but no {questions_dir}/ folder "
                f"(expected {questions_dir}/<name>.txt for each {images_dir}/<name>.jpg)"
            )
    else:
        image_folder = text_folder = folder
    texts = sorted(text_folder.glob("*.txt"))
    if not texts:
        raise FileNotFoundError(
            f"no question files in {text_folder} (expected one <name>.txt per image <name>.jpg/.png)"
        )
    pairs = []
    for text in texts:
        candidates = [image_folder / (text.stem + suffix) for suffix in IMAGE_SUFFIXES]
        image = next((path for path in candidates if path.is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{text}: no image {text.stem}.jpg or {text.stem}.png in {image_folder}")
        pairs.append((text, image))
    return pairs


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The (question, "yes"/"no") lines of one question file; blank lines are ignored."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        question, tab, answer = line.rpartition("\t")
        answer = answer.strip().lower()
        if not tab or not question.strip() or answer not in ("yes", "no"):
            raise ValueError(f"{path}:{number}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}")
        pairs.append((question.strip(), answer))
    if len(pairs) != QUESTIONS_PER_IMAGE:
        raise ValueError(
            f"{path}: expected the image's {QUESTIONS_PER_IMAGE} questions (one 'question<TAB>Yes|No' a line), "
            f"found {len(pairs)}"
        )
    return pairs


def strip_suffix(question: str, suffix: str) -> str:
    """The question without its trailing `suffix` (the release has one or two spaces before it)."""
    if suffix and question.endswith(suffix):
        return question[: -len(suffix)].strip()
    return question


class MMEBenchmark(FileBenchmark):
    """MME (14 yes/no subtasks, two questions per image) from the release folder.

    Args:
        root: the release folder `MME_Benchmark_release_version` (one folder per subtask).
        subtasks: subtask folders to read, default all 14 (10 perception, 4 cognition).
        prompt: question template, `{question}` is the question; LLaVA-1.5's by default.
        remove_suffix: dropped from the end of each question before templating ("" keeps questions whole).
        images_dir, questions_dir: the two folder names of the images/ + questions_answers_YN/ layout.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        subtasks: list[str] | None = None,
        prompt: str = SHORT_ANSWER,
        remove_suffix: str = YES_NO_SUFFIX,
        images_dir: str = "images",
        questions_dir: str = "questions_answers_YN",
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        subtasks = list(SUBTASKS if subtasks is None else subtasks)
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown or not subtasks or len(set(subtasks)) != len(subtasks):
            raise ValueError(f"subtasks must be distinct MME subtasks from {list(SUBTASKS)}, got {subtasks}")
        self.subtasks = subtasks
        self.remove_suffix = remove_suffix
        self.images_dir = images_dir
        self.questions_dir = questions_dir

    @property
    def name(self) -> str:
        return "mme"

    def load_records(self) -> list[Record]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"MME root {self.root} is not a folder (expected the release folder MME_Benchmark_release_version "
                f"with one folder per subtask: {', '.join(SUBTASKS)})"
            )
        records = []
        for subtask in self.subtasks:
            folder = self.root / subtask
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"MME subtask folder {folder} does not exist (expected one folder per subtask in {self.root}, "
                    f"the release folder MME_Benchmark_release_version, or the folder one level down that holds "
                    f"them; `subtasks` picks fewer)"
                )
            group = "perception" if subtask in PERCEPTION else "cognition"
            for text, image in question_files(folder, self.images_dir, self.questions_dir):
                image_id = image.relative_to(self.root).as_posix()
                for k, (question, answer) in enumerate(read_pairs(text)):
                    question = self.prompt.format(question=strip_suffix(question, self.remove_suffix))
                    meta = {"image_id": image_id, "group": group}
                    records.append(Record(f"{image_id}#{k}", image, question, answer, subtask, meta=meta))
        return records

    def metric(self):
        """MME's perception/cognition scores, accuracy and accuracy+ per subtask."""
        from ..benchmark_metrics import MMEScore  # here: the metrics module is optional at import

        return MMEScore(tasks=self.subtasks)  # per-subtask results in the official order
