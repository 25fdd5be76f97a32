"""Metrics of the standard multimodal benchmarks, each a torchmetrics `Metric` that works under DDP.

| metric | benchmark | rule it follows |
| --- | --- | --- |
| `VQAv2Accuracy` | VQAv2, TextVQA | GT-Vision-Lab/VQA `vqaEval.py`: answer normalisation, ten-annotator rule |
| `ExactMatchAccuracy` | GQA | LLaVA's `convert_gqa_for_eval.py` (lower case, trailing "." off) then GQA's exact match |
| `POPEMetrics` | POPE | LLaVA's `eval_pope.py`: yes/no parsing, accuracy, precision, recall, F1, yes-ratio |
| `MMEScore` | MME | MME's `eval_tool/calculation.py`: acc, acc+ per image, score = 100 (acc + acc+) |
| `MultipleChoiceAccuracy` | ScienceQA-IMG, MMBench | LLaVA's `eval_science_qa.py`, `eval_mmbench.py` letters |
| `Loyalty` | any | agreement with a reference (unpruned) model's answers after VQA normalisation |

Every metric takes `update(predictions, batch)`: `predictions` holds the model's answers and `batch`
the collated record fields as lists (keys id, question, answer, task, answers, options, meta; see
`data.jsonl.Record`). Rows whose `batch["skipped"]` is true (an unreadable image) are left out.
`compute()` returns a dict with at least "accuracy" (overall, 0..1), "accuracy_by_task"
({task: accuracy}) and "total" (questions scored), plus each benchmark's own keys.

DDP. Each metric keeps one row per question in list states reduced with `dist_reduce_fx="cat"`:
a key of (task, id), the task, and the metric's per-question values (score, image, circular
group, ...). Grouped quantities (MME's acc+ over the two questions of an image, MMBench's circular
groups) are therefore exact however a `DistributedSampler` spreads a group over processes, and the
questions that sampler repeats to even out the processes are counted once (rows with the same
(task, id) key after the gather; "duplicates" in `compute()` counts the rows dropped). Strings do
not travel through `all_gather`, so ids, images and groups are stored as 62-bit hashes and task
names as fixed-width UTF-8 rows (`MAX_TASK_BYTES`).
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "Loyalty",
    "MMEScore",
    "ExactMatchAccuracy",
    "MultipleChoiceAccuracy",
    "POPEMetrics",
    "VQAv2Accuracy",
    "normalize_vqa_answer",
    "parse_mme_answer",
    "parse_option_letter",
    "parse_pope_answer",
    "vqa_score",
]

# ----------------------------------------------------------------------------------------------
# VQA answer normalisation (GT-Vision-Lab/VQA vqa/vqaEval.py, the Python 3 version, whose tables
# the EvalAI server and LLaVA's m4c_evaluator.py also use).
# ----------------------------------------------------------------------------------------------

# Contractions written without their apostrophe(s), mapped to the written form. The table is the
# official one, quirks included ("somebody'd" -> "somebodyd"; the capitalised keys never match
# because words are lower-cased first).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# Removed (or turned into a space, see `process_punctuation`). The apostrophe, colon and period are
# not in the list: contractions keep their apostrophe, and periods have their own rule.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a mistyped look-behind that never
# fails, so it removes every period not followed by a digit ("5." -> "5", "yes." -> "yes", "2.5" kept).
_PERIOD = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """vqaEval's `processPunctuation`.

    Each mark in `PUNCTUATION` is deleted when it touches a space somewhere in the text (or the
    text holds a digit-comma-digit such as "1,000"), else replaced by a space ("black-and-white"
    -> "black and white", "red, white" -> "red white", "3,000" -> "3000"); then periods not
    followed by a digit are deleted.
    """
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """vqaEval's `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """An answer as vqaEval compares it: "Two dogs." -> "2 dogs", "The dog" -> "dog", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """The ten-annotator rule: min(#humans who gave the answer / 3, 1), averaged over leaving out each human.

    Both sides are normalised. With m of the n humans matching, leaving out a matching human leaves
    m - 1 matches and leaving out any other leaves m, so the score is
    (m min((m - 1) / 3, 1) + (n - m) min(m / 3, 1)) / n: 0.3, 0.6, 0.9, 1 for m = 1, 2, 3, 4+ of 10.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    n = len(answers)
    m = sum(normalize_vqa_answer(answer) == predicted for answer in answers)
    return (m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n


# ----------------------------------------------------------------------------------------------
# Answer parsers of the other benchmarks' official scripts
# ----------------------------------------------------------------------------------------------


def parse_pope_answer(text: str) -> str:
    """Yes or no, as LLaVA's eval_pope.py reads an answer.

    Only the first sentence counts; commas are dropped; the answer is "no" when a space-separated
    word is exactly "No", "no" or "not", else "yes" (so anything unparseable counts as "yes").
    """
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_mme_answer(text: str) -> str:
    """Yes, no or other, as MME's calculation.py reads an answer (lower-cased, then its first 4 characters)."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


_ANSWER_IS = re.compile(r"the answer is \(?([A-Z])(?![A-Za-z])", re.IGNORECASE)


def parse_option_letter(prediction: str, options: Sequence[str] = (), match_option_text: bool = True) -> str | None:
    """The option letter a multiple-choice answer names, or None, by LLaVA's deterministic rules.

    Valid letters are the first len(options) capitals (all 26 when `options` is empty). In order:
    1. the answer is a letter, ignoring surrounding periods and case ("B", "b.": eval_mmbench.py;
       eval_science_qa.py takes the exact letter);
    2. it starts with "B. " (eval_science_qa.py);
    3. it contains "The answer is B" (both scripts; any case for the words, a capital letter not
       followed by another letter);
    4. with `match_option_text`, exactly one option's text contains the answer, case-insensitively
       (eval_mmbench.py, before it falls back to ChatGPT).
    Answers LLaVA would send to ChatGPT count as unparsed here.
    """
    letters = string.ascii_uppercase[: len(options)] if options else string.ascii_uppercase
    text = prediction.replace("\n", ". ").strip()
    bare = text.strip(".").strip().upper()
    if len(bare) == 1 and bare in letters:
        return bare
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    match = _ANSWER_IS.search(text)
    if match and match.group(1) in letters:
        return match.group(1)
    if match_option_text and text and options:
        hits = [letter for letter, option in zip(letters, options) if text.lower() in str(option).lower()]
        if len(hits) == 1:
            return hits[0]
    return None


# ----------------------------------------------------------------------------------------------
# Per-question state shared by every metric
# ----------------------------------------------------------------------------------------------

MAX_TASK_BYTES = 256  # width of a task-name row in the state (UTF-8 bytes)
_HASH_MASK = (1 << 62) - 1


def stable_key(*parts: object) -> int:
    """A process-independent 62-bit hash (1..2**62) of `parts` (Python's hash() differs between processes)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & _HASH_MASK) + 1


def _column(state: list[Tensor] | Tensor) -> Tensor:
    """A list state as one tensor (it is a list before a sync and a tensor after one)."""
    if isinstance(state, Tensor):
        return state.reshape(-1)
    if not state:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in state])


def _field(batch: Mapping[str, Sequence], key: str, index: int, default=None):
    values = batch.get(key)
    return default if values is None else values[index]


def _meta(batch: Mapping[str, Sequence], index: int) -> Mapping:
    meta = _field(batch, "meta", index)
    return meta if isinstance(meta, Mapping) else {}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _tensor(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


class _PerQuestionMetric(Metric):
    """One row per question in "cat" list states: key, task and the subclass's `columns`.

    Subclasses name their per-question values in `columns`, score one question in `score_row`
    and summarise the rows in `summarise`.

    Args:
        tasks: task names to list first, in this order, in the per-task results (others follow
            sorted); optional, any task seen in `update` is reported.
        dedup: count each (task, id) once (the repeats a `DistributedSampler` adds to even out
            processes). Rows without an id are never merged.
    """

    full_state_update = False
    higher_is_better = True
    columns: tuple[tuple[str, torch.dtype], ...] = ()  # (state name, dtype) of each per-question value

    def __init__(self, tasks: Sequence[str] = (), dedup: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tasks = list(dict.fromkeys(str(task) for task in tasks))
        self.dedup = dedup
        self.add_state("question_keys", default=[], dist_reduce_fx="cat")
        self.add_state("task_keys", default=[], dist_reduce_fx="cat")
        self.add_state("task_names", default=[], dist_reduce_fx="cat")
        for column, _ in self.columns:
            self.add_state(column, default=[], dist_reduce_fx="cat")
        self._named: set[int] = set()  # task keys whose name this process has stored since reset

    def reset(self) -> None:
        super().reset()
        self._named = set()

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple:
        """The values of `columns` for question `index` of `batch`."""
        raise NotImplementedError

    def update(self, predictions: Sequence[str], batch: Mapping[str, Sequence]) -> None:
        """Score `predictions[i]` against row i of `batch` (collated record fields, as lists)."""
        size = len(predictions)
        for key, values in batch.items():
            if key in ("id", "answer", "task", "answers", "options", "meta", "skipped") and len(values) != size:
                raise ValueError(f"{len(predictions)} predictions but batch[{key!r}] has {len(values)} entries")
        rows = [i for i in range(size) if not _field(batch, "skipped", i, False)]
        tasks = [str(_field(batch, "task", i, "all")) for i in rows]
        ids = [_field(batch, "id", i) for i in rows]
        question_keys = [0 if qid is None else stable_key(task, qid) for task, qid in zip(tasks, ids)]
        values = [self.score_row(str(predictions[i]), batch, i) for i in rows]
        device = self.device
        self.question_keys.append(torch.tensor(question_keys, dtype=torch.long, device=device))
        self.task_keys.append(torch.tensor([stable_key(t) for t in tasks], dtype=torch.long, device=device))
        for j, (column, dtype) in enumerate(self.columns):
            column_values = [row[j] for row in values]
            getattr(self, column).append(torch.tensor(column_values, dtype=dtype, device=device))
        for task in dict.fromkeys(tasks):
            key = stable_key(task)
            if key not in self._named:
                self.task_names.append(self._encode_name(task).to(device))
                self._named.add(key)

    @staticmethod
    def _encode_name(task: str) -> Tensor:
        raw = task.encode("utf-8")
        if len(raw) > MAX_TASK_BYTES:
            raise ValueError(f"task name {task[:40]!r}... is longer than {MAX_TASK_BYTES} UTF-8 bytes")
        return torch.tensor(list(raw.ljust(MAX_TASK_BYTES, b"\0")), dtype=torch.uint8)

    def _rows(self) -> tuple[list[str], list[list], int]:
        """(task per question, values per column, duplicates dropped), after the (task, id) dedup."""
        names = {}
        for row in _column(self.task_names).to(torch.uint8).reshape(-1, MAX_TASK_BYTES).tolist():
            name = bytes(row).rstrip(b"\0").decode("utf-8")
            names[stable_key(name)] = name
        question_keys = _column(self.question_keys).long().tolist()
        task_keys = _column(self.task_keys).long().tolist()
        columns = [_column(getattr(self, column)).to(dtype).tolist() for column, dtype in self.columns]
        keep, seen = [], set()
        for i, key in enumerate(question_keys):
            if self.dedup and key:
                if key in seen:
                    continue
                seen.add(key)
            keep.append(i)
        tasks = [names[task_keys[i]] for i in keep]
        return tasks, [[column[i] for i in keep] for column in columns], len(question_keys) - len(keep)

    def _ordered(self, tasks: Sequence[str]) -> list[str]:
        present = set(tasks)
        return [t for t in self.tasks if t in present] + sorted(present - set(self.tasks))

    def compute(self) -> dict:
        tasks, columns, duplicates = self._rows()
        result = self.summarise(tasks, columns)
        result["total"] = torch.tensor(len(tasks))
        result["duplicates"] = torch.tensor(duplicates)
        return result

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        """The result dict from the kept rows: a task and the `columns` values per question."""
        raise NotImplementedError


class _MeanScore(_PerQuestionMetric):
    """Accuracy = mean of a per-question score in 0..1, overall and per task."""

    columns = (("scores", torch.float64),)

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        (scores,) = columns
        by_task = {}
        for task in self._ordered(tasks):
            values = [s for t, s in zip(tasks, scores) if t == task]
            by_task[task] = _tensor(sum(values) / len(values))
        return {"accuracy": _tensor(_ratio(sum(scores), len(scores))), "accuracy_by_task": by_task}


# ----------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------


class VQAv2Accuracy(_MeanScore):
    """VQA accuracy (VQAv2, TextVQA): `vqa_score` of the prediction against `batch["answers"]`.

    Per task = per answer type for VQAv2 ("yes/no", "number", "other"). A row without annotator
    answers is scored by normalised exact match against `batch["answer"]`.

    Args:
        tasks, dedup: see `_PerQuestionMetric`.
    """

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[float]:
        answers = _field(batch, "answers", index) or ()
        if answers:
            return (vqa_score(prediction, [str(a) for a in answers]),)
        reference = normalize_vqa_answer(str(batch["answer"][index]))
        return (float(normalize_vqa_answer(prediction) == reference),)


_NORMALIZERS: dict[str, Callable[[str], str]] = {
    # LLaVA's convert_gqa_for_eval.py: res['text'].rstrip('.').lower(); GQA's eval.py then compares exactly.
    "gqa": lambda text: text.strip().rstrip(".").lower(),
    "vqa": normalize_vqa_answer,
    "none": lambda text: text,
}


class ExactMatchAccuracy(_MeanScore):
    """Exact match of prediction and `batch["answer"]` after a normalisation (GQA).

    Args:
        normalization: "gqa" (default; LLaVA's GQA conversion: strip, trailing periods off, lower
            case, applied to both sides; matches LLaVA-1.5's reported GQA numbers), "vqa"
            (`normalize_vqa_answer`, more lenient: articles, number words, punctuation) or "none".
        tasks, dedup: see `_PerQuestionMetric`.
    """

    def __init__(self, normalization: str = "gqa", tasks: Sequence[str] = (), dedup: bool = True, **kwargs) -> None:
        if normalization not in _NORMALIZERS:
            raise ValueError(f"normalization must be one of {sorted(_NORMALIZERS)}, got {normalization!r}")
        super().__init__(tasks=tasks, dedup=dedup, **kwargs)
        self.normalization = normalization

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[float]:
        normalize = _NORMALIZERS[self.normalization]
        return (float(normalize(prediction) == normalize(str(batch["answer"][index]))),)


class POPEMetrics(_PerQuestionMetric):
    """POPE as LLaVA's eval_pope.py scores it; "yes" is the positive class.

    Answers are read with `parse_pope_answer`; the reference (`batch["answer"]`) is "no" when it
    reads "no" (any case) and "yes" otherwise, as eval_pope.py reads the labels. Per task = per
    setting (random / popular / adversarial), which is how eval_pope.py reports.

    compute(): "accuracy", "precision", "recall", "f1", "yes_ratio" over all questions, the same
    five per task as "<name>_by_task", and "f1_mean" / "accuracy_mean", the mean over tasks (papers
    quote POPE as the mean of the three settings). An undefined ratio (no positive predictions, no
    positive labels) is 0, where eval_pope.py would divide by zero.

    Args:
        tasks, dedup: see `_PerQuestionMetric`.
    """

    columns = (("predicted_yes", torch.long), ("label_yes", torch.long))

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[int, int]:
        label_yes = str(batch["answer"][index]).strip().lower() != "no"
        return int(parse_pope_answer(prediction) == "yes"), int(label_yes)

    @staticmethod
    def _scores(predicted: list[float], labels: list[float]) -> dict[str, float]:
        tp = sum(p and y for p, y in zip(predicted, labels))
        fp = sum(p and not y for p, y in zip(predicted, labels))
        tn = sum(not p and not y for p, y in zip(predicted, labels))
        fn = sum(not p and y for p, y in zip(predicted, labels))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total = len(predicted)
        return {
            "accuracy": _ratio(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": _ratio(sum(bool(p) for p in predicted), total),
        }

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        predicted, labels = columns
        overall = self._scores(predicted, labels)
        per_task = {
            task: self._scores(
                [p for t, p in zip(tasks, predicted) if t == task], [y for t, y in zip(tasks, labels) if t == task]
            )
            for task in self._ordered(tasks)
        }
        result: dict = {name: _tensor(value) for name, value in overall.items()}
        for name in overall:
            result[f"{name}_by_task"] = {task: _tensor(scores[name]) for task, scores in per_task.items()}
        for name in ("f1", "accuracy"):
            values = [scores[name] for scores in per_task.values()]
            result[f"{name}_mean"] = _tensor(_ratio(sum(values), len(values)))
        return result


MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_CANONICAL = {name.lower(): name for name in MME_PERCEPTION + MME_COGNITION}


def _mme_subtask(task: str) -> str:
    name = _MME_CANONICAL.get(task.strip().lower().replace(" ", "_"))
    if name is None:
        raise ValueError(f"{task!r} is not an MME subtask; expected one of {list(_MME_CANONICAL.values())}")
    return name


class MMEScore(_PerQuestionMetric):
    """MME as its eval_tool/calculation.py scores it.

    The task is the subtask (its folder name; case, spaces for underscores tolerated) and
    `batch["meta"][i]["image_id"]` names the image, whose questions (two in MME: one "yes", one
    "no") make up one acc+ unit. Answers are read with `parse_mme_answer` ("other" is wrong); the
    reference must be yes or no.

    compute(): "accuracy" (all questions) and "accuracy_by_task" (acc), "accuracy_plus_by_task"
    (acc+: share of images with every question right), "score_by_task" = 100 (acc + acc+),
    "perception" / "cognition" = the sums of the subtask scores (of the subtasks present; full MME:
    10 perception subtasks, max 2000; 4 cognition, max 800), "score" = their sum.

    Args:
        tasks, dedup: see `_PerQuestionMetric`.
    """

    columns = (("correct", torch.long), ("image_keys", torch.long))

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[int, int]:
        subtask = _mme_subtask(str(_field(batch, "task", index, "")))
        reference = str(batch["answer"][index]).strip().lower()
        if reference not in ("yes", "no"):
            question = _field(batch, "id", index, index)
            raise ValueError(f"MME question {question}: reference answer must be yes or no, got {reference!r}")
        meta = _meta(batch, index)
        if "image_id" not in meta:
            question = _field(batch, "id", index, index)
            raise ValueError(f"MME question {question}: batch['meta'] needs 'image_id' to pair the image's questions")
        return int(parse_mme_answer(prediction) == reference), stable_key(subtask, meta["image_id"])

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        correct, images = columns
        acc, acc_plus, score = {}, {}, {}
        for task in self._ordered(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            per_image: dict[int, bool] = {}
            for i in rows:
                per_image[images[i]] = per_image.get(images[i], True) and bool(correct[i])
            acc[task] = sum(correct[i] for i in rows) / len(rows)
            acc_plus[task] = sum(per_image.values()) / len(per_image)
            score[task] = 100 * (acc[task] + acc_plus[task])
        perception = sum(s for t, s in score.items() if _mme_subtask(t) in MME_PERCEPTION)
        cognition = sum(s for t, s in score.items() if _mme_subtask(t) in MME_COGNITION)
        return {
            "accuracy": _tensor(_ratio(sum(correct), len(correct))),
            "accuracy_by_task": {t: _tensor(v) for t, v in acc.items()},
            "accuracy_plus_by_task": {t: _tensor(v) for t, v in acc_plus.items()},
            "score_by_task": {t: _tensor(v) for t, v in score.items()},
            "perception": _tensor(perception),
            "cognition": _tensor(cognition),
            "score": _tensor(perception + cognition),
        }


class MultipleChoiceAccuracy(_PerQuestionMetric):
    """Multiple-choice accuracy (ScienceQA-IMG, MMBench): the parsed letter equals `batch["answer"]`.

    The letter is read with `parse_option_letter` against `batch["options"][i]`.

    Args:
        circular: MMBench's circular evaluation. Questions sharing `batch["meta"][i]["circular"]`
            (else `meta["index"]`, else the id) form a group, right only if every question of it is
            right; "accuracy" and "accuracy_by_task" are then over groups (a group's task is its
            first question's).
        match_option_text: also accept an answer that matches exactly one option's text (rule 4
            of `parse_option_letter`, from eval_mmbench.py).
        tasks, dedup: see `_PerQuestionMetric`.

    compute() adds "question_accuracy" (per question, whatever `circular`) and "groups".
    """

    columns = (("correct", torch.long), ("group_keys", torch.long))

    def __init__(
        self,
        circular: bool = False,
        match_option_text: bool = True,
        tasks: Sequence[str] = (),
        dedup: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(tasks=tasks, dedup=dedup, **kwargs)
        self.circular = circular
        self.match_option_text = match_option_text

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[int, int]:
        options = tuple(_field(batch, "options", index) or ())
        letter = parse_option_letter(prediction, options, self.match_option_text)
        correct = letter is not None and letter == str(batch["answer"][index]).strip().upper()
        meta = _meta(batch, index)
        group = meta.get("circular", meta.get("index", _field(batch, "id", index)))
        # Key 0: no group id at all (no meta, no id), so the question is a group of its own.
        return int(correct), 0 if group is None else stable_key("group", group)

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        correct, group_keys = columns
        groups: dict[object, list] = {}  # group -> [task of its first question, all right so far]
        for i, (task, right, group) in enumerate(zip(tasks, correct, group_keys)):
            entry = groups.setdefault(group or ("alone", i), [task, True])
            entry[1] = entry[1] and bool(right)
        question_accuracy = _ratio(sum(correct), len(correct))
        if self.circular:
            units = [(task, float(all_right)) for task, all_right in groups.values()]
        else:
            units = list(zip(tasks, correct))
        by_task = {}
        for task in self._ordered([t for t, _ in units]):
            values = [v for t, v in units if t == task]
            by_task[task] = _tensor(sum(values) / len(values))
        return {
            "accuracy": _tensor(_ratio(sum(v for _, v in units), len(units))),
            "accuracy_by_task": by_task,
            "question_accuracy": _tensor(question_accuracy),
            "groups": torch.tensor(len(groups)),
        }


class Loyalty(_MeanScore):
    """Agreement with a reference model's answers to the same questions (e.g. the unpruned model).

    The reference answer of row i is `batch["meta"][i]["reference"]` when present, else
    `references[batch["id"][i]]`; a row with neither is an error. Both answers are compared after
    `normalize_vqa_answer`, so "Yes." agrees with "yes" and "two" with "2". "accuracy" is the
    loyalty (share of questions answered as the reference did), also given as "loyalty".

    Args:
        references: question id -> reference answer (ids compared as strings), e.g. read from the
            unpruned run's predictions.
        tasks, dedup: see `_PerQuestionMetric`.
    """

    def __init__(
        self, references: Mapping[str, str] | None = None, tasks: Sequence[str] = (), dedup: bool = True, **kwargs
    ) -> None:
        super().__init__(tasks=tasks, dedup=dedup, **kwargs)
        self.references = {str(k): str(v) for k, v in (references or {}).items()}

    def score_row(self, prediction: str, batch: Mapping[str, Sequence], index: int) -> tuple[float]:
        meta = _meta(batch, index)
        if "reference" in meta:
            reference = str(meta["reference"])
        else:
            question = str(_field(batch, "id", index))
            if question not in self.references:
                raise ValueError(
                    f"no reference answer for question {question}: give batch['meta'][i]['reference'] or "
                    f"Loyalty(references={{id: answer}})"
                )
            reference = self.references[question]
        return (float(normalize_vqa_answer(prediction) == normalize_vqa_answer(reference)),)

    def summarise(self, tasks: list[str], columns: list[list[float]]) -> dict:
        result = super().summarise(tasks, columns)
        result["loyalty"] = result["accuracy"]
        return result
