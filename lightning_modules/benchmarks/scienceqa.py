"""`ScienceQABenchmark`: ScienceQA-IMG, the multiple-choice science questions that come with an image.

    vtprune validate -c configs/experiment/demo.yaml -c configs/data/scienceqa.yaml --data.root=DIR

ScienceQA (Lu et al., "Learn to Explain: Multimodal Reasoning via Thought Chains for Science Question
Answering", NeurIPS 2022, github.com/lupantech/ScienceQA). `root` holds the release's data/scienceqa files
as LLaVA-1.5's docs/Evaluation.md asks for them:

    <root>/problems.json                 {pid: {question, choices, answer (index), hint, image, split, subject, ...}}
    <root>/pid_splits.json               {"train": [pid, ...], "val": [...], "test": [...], ...}
    <root>/images/<split>/<pid>/image.png

ScienceQA-IMG is the problems of `split` (test) whose `image` is set: 2,017 of the 4,241 test problems,
the subset LLaVA-1.5 reports.

Prompt: as in LLaVA-1.5's playground/data/eval/scienceqa/llava_test_CQM-A.json plus the
`--single-pred-prompt` line of llava/eval/model_vqa_science.py:

    Context: <hint>            (only when the hint is not empty)
    <question>
    A. <choice 0>
    B. <choice 1>
    Answer with the option's letter from the given choices directly.

Records: id = pid, answer = the correct letter, options = the choices in letter order, task = subject
(natural / social / language science), meta {"pid", "subject", "grade", "category", "topic", "has_context"}.
Metric: `MultipleChoiceAccuracy` (overall = ScienceQA-IMG accuracy, per subject). An unreadable image
does not stop a run: `SkippingRecordDataset` marks the sample skipped.
"""

from __future__ import annotations

from pathlib import Path
from string import ascii_uppercase

from data.jsonl import Record

from . import FileBenchmark, read_json

PROMPT = "{context}{question}\n{options}\nAnswer with the option's letter from the given choices directly."
CONTEXT = "Context: {hint}\n"


def format_options(options: tuple[str, ...] | list[str]) -> str:
    """The options as LLaVA-1.5's evaluation lists them: "A. first\\nB. second"."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(ascii_uppercase, options))


def multiple_choice_prompt(template: str, context_template: str, question: str, hint: str, options) -> str:
    """`template` filled in: {context} is `context_template` with {hint} (empty when there is no hint),
    {question} the question, {options} the lettered options."""
    context = context_template.format(hint=hint) if hint.strip() else ""
    return template.format(context=context, question=question, options=format_options(options))


def check_templates(template: str, context_template: str) -> None:
    """ValueError unless the prompt lists the options and the context template shows the hint
    (`FileBenchmark` checks {question} and that no other placeholder than {context}, {options} appears)."""
    if "{options}" not in template:
        raise ValueError(f"prompt must contain '{{options}}' (and {{question}}, {{context}}), got {template!r}")
    if "{context}" in template and "{hint}" not in context_template:
        raise ValueError(f"context_template must contain '{{hint}}', got {context_template!r}")


def problem_record(pid: str, problem, where: str, image_root: Path, split: str, prompt: str, context: str) -> Record:
    """One ScienceQA-IMG record; `where` names the problem in errors."""
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: expected an object with question, choices, answer, image, got {problem!r:.80}")
    question, choices, answer = problem.get("question"), problem.get("choices"), problem.get("answer")
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' must be a string, got {question!r:.80}")
    if not (isinstance(choices, list) and 2 <= len(choices) <= 26 and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to 26 strings, got {choices!r:.80}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(
            f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}"
        )
    hint = problem.get("hint") or ""
    image = image_root / str(problem.get("split", split)) / pid / str(problem["image"])
    if not image.is_file():
        raise FileNotFoundError(f"{where}: image {problem['image']!r} expected at {image}, which does not exist")
    subject = str(problem.get("subject") or "img")
    meta = {"pid": pid, "subject": subject, "has_context": bool(hint.strip())}
    meta.update({key: problem[key] for key in ("grade", "category", "topic") if key in problem})
    return Record(
        id=pid,
        image=image,
        question=multiple_choice_prompt(prompt, context, question, hint, choices),
        answer=ascii_uppercase[answer],
        task=subject,
        options=tuple(choices),
        meta=meta,
    )


class ScienceQABenchmark(FileBenchmark):
    """ScienceQA-IMG: the problems of `split` that have an image.

    Args:
        root: the folder with problems.json, pid_splits.json and images/.
        split: the pid_splits.json split ("test" is what papers report; "val", "minitest", ...).
        prompt: template with {context}, {question}, {options}; LLaVA-1.5's by default.
        context_template: what {context} becomes when the problem has a hint ({hint}); "" otherwise.
        problems_file, splits_file, images_dir: the release's names.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    prompt_fields = ("context", "question", "options")

    def __init__(
        self,
        root: str,
        split: str = "test",
        prompt: str = PROMPT,
        context_template: str = CONTEXT,
        problems_file: str = "problems.json",
        splits_file: str = "pid_splits.json",
        images_dir: str = "images",
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(root, prompt, batch_size, num_workers, limit, shuffle_seed)
        check_templates(prompt, context_template)
        self.split = split
        self.context_template = context_template
        self.problems_file = problems_file
        self.splits_file = splits_file
        self.images_dir = images_dir

    @property
    def name(self) -> str:
        return f"scienceqa-img:{self.split}"

    def load_records(self) -> list[Record]:
        problems_path, splits_path = self.root / self.problems_file, self.root / self.splits_file
        problems = read_json(problems_path, "an object {problem id: {question, choices, answer, image, ...}}")
        splits = read_json(splits_path, 'an object {"train": [problem id, ...], "test": [...], ...}')
        if not isinstance(problems, dict):
            raise ValueError(
                f"{problems_path}: expected an object {{problem id: problem}}, got {type(problems).__name__}"
            )
        if not isinstance(splits, dict) or not isinstance(splits.get(self.split), list):
            keys = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise ValueError(f"{splits_path}: expected a list of problem ids under {self.split!r}; found {keys}")
        records, image_root, templates = [], self.root / self.images_dir, (self.prompt, self.context_template)
        for pid in map(str, splits[self.split]):
            if pid not in problems:
                raise ValueError(f"{splits_path}: problem {pid!r} of split {self.split!r} is not in {problems_path}")
            problem = problems[pid]
            if isinstance(problem, dict) and not problem.get("image"):
                continue  # a text-only problem: not part of ScienceQA-IMG
            where = f"{problems_path}: problem {pid!r}"
            records.append(problem_record(pid, problem, where, image_root, self.split, *templates))
        return records

    def metric(self):
        """Multiple-choice accuracy (option letter parsed from the answer), overall and per subject."""
        from ..benchmark_metrics import MultipleChoiceAccuracy  # here: the metrics module is optional at import

        return MultipleChoiceAccuracy(circular=False, tasks=self.metric_tasks())
