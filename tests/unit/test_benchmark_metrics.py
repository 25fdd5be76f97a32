"""Benchmark metrics: normalisation, parsers and hand-computed values; split-and-merge equals whole (DDP)."""

import json
import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_modules import benchmark_metrics as bm
from lightning_modules.benchmark_metrics import (
    ExactMatchAccuracy,
    Loyalty,
    MMEScore,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAv2Accuracy,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_pope_answer,
    vqa_score,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("id", "question", "answer", "task", "answers", "options", "meta")


def batch(rows: list[dict]) -> dict[str, list]:
    """Collate rows as `datamodule.collate` does: one list per field (missing fields take Record's defaults)."""
    defaults = {"question": "q", "task": "all", "answers": (), "options": (), "meta": {}}
    return {key: [row.get(key, defaults.get(key)) for row in rows] for key in FIELDS}


def feed(metric, predictions: list[str], rows: list[dict], batch_size: int = 3) -> None:
    for start in range(0, len(rows), batch_size):
        metric.update(predictions[start : start + batch_size], batch(rows[start : start + batch_size]))


def run(metric, predictions: list[str], rows: list[dict], batch_size: int = 3) -> dict:
    feed(metric, predictions, rows, batch_size)
    return metric.compute()


def plain(value):
    """A compute() result as plain Python numbers (NaN as the string "nan") for comparisons."""
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    number = float(value)
    return "nan" if math.isnan(number) else number


def close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(close(a[k], b[k]) for k in a)
    return a == b if isinstance(a, str) or isinstance(b, str) else a == pytest.approx(b, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# VQA normalisation and the ten-annotator rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("Two", "2"),  # number words to digits, lower case
        ("ten", "10"),
        ("None", "0"),
        ("the dog", "dog"),  # articles dropped
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table: both become "don't"
        ("isnt", "isn't"),
        ("5.", "5"),  # a period not followed by a digit goes
        ("yes.", "yes"),
        ("Yes", "yes"),
        (" yes\n", "yes"),
        ("black-and-white", "black and white"),  # "-" touching no space becomes a space
        ("red, white", "red white"),  # "," touching a space is deleted
        ("3,000", "3000"),  # digit-comma-digit: marks deleted, not spaced
        ("What?", "what"),
        ("(a) cat!", "cat"),
    ],
)
def test_normalisation_makes_equal(left, right):
    assert normalize_vqa_answer(left) == normalize_vqa_answer(right)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two Dogs.", "2 dogs"),
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("dont", "don't"),
        ("don't", "don't"),  # the apostrophe is not punctuation for VQA
        ("man's hat", "man's hat"),
        ("the", ""),
        ("x,y", "x y"),
        ("\tthe  Red\tcar ", "red car"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # m of 10 humans gave the answer. Leaving out one of the m leaves m-1 matches, leaving out one
        # of the other 10-m leaves m; each subset scores min(matches / 3, 1); the score is the mean.
        (0, 0.0),
        (1, (1 * 0 / 3 + 9 * 1 / 3) / 10),  # = 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # = (2/3 + 16/3) / 10 = 0.6
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # = 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # = 1.0
        (10, 1.0),
    ],
)
def test_ten_annotator_rule(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_score("Two", answers) == pytest.approx(expected)
    assert [round(vqa_score("2", ["2"] * m + ["3"] * (10 - m)), 10) for m in (1, 2, 3)] == [0.3, 0.6, 0.9]


def test_ten_annotator_rule_normalises_the_human_answers_too():
    # "the dog", "Dog." and "dog" are the same answer: 3 of 10 -> 0.9; "dogs" matches none of them.
    answers = ["the dog", "Dog.", "dog"] + ["cat"] * 7
    assert vqa_score("dog", answers) == pytest.approx(0.9)
    assert vqa_score("dogs", answers) == 0.0


VQA_ROWS = [
    {"id": 1, "task": "number", "answer": "2", "answers": ("2",) * 2 + ("3",) * 8},
    {"id": 2, "task": "number", "answer": "3", "answers": ("3",) * 10},
    {"id": 3, "task": "yes/no", "answer": "yes", "answers": ("yes",) * 9 + ("no",)},
    {"id": 4, "task": "other", "answer": "dog", "answers": ("dog",) * 3 + ("puppy",) * 7},
    {"id": 5, "task": "other", "answer": "don't know", "answers": ("don't know",) * 4 + ("no",) * 6},
    {"id": 6, "task": "other", "answer": "red", "answers": ()},  # no annotators: exact match on `answer`
]
VQA_PREDICTIONS = ["Two", "three.", "No", "The dog", "dont know", "Red."]
# 0.6 (2 of 10); 1.0 ("three." -> "3", 10 of 10); 0.3 ("no": 1 of 10); 0.9 (3 of 10); 1.0 (4 of 10);
# 1.0 (exact match). number: (0.6 + 1) / 2 = 0.8; yes/no: 0.3; other: (0.9 + 1 + 1) / 3; all: 4.8 / 6.
VQA_EXPECTED = {"number": 0.8, "yes/no": 0.3, "other": 2.9 / 3}


def test_vqav2_accuracy_on_fixed_answers():
    result = run(VQAv2Accuracy(tasks=["yes/no", "number", "other"]), VQA_PREDICTIONS, VQA_ROWS)
    assert float(result["accuracy"]) == pytest.approx(4.8 / 6)
    assert plain(result["accuracy_by_task"]) == pytest.approx(VQA_EXPECTED)
    assert list(result["accuracy_by_task"]) == ["yes/no", "number", "other"]  # the order of `tasks`
    assert int(result["total"]) == 6 and int(result["duplicates"]) == 0


def test_exact_match_gqa_and_vqa_normalisation():
    rows = [
        {"id": i, "answer": a, "task": t} for i, (a, t) in enumerate([("left", "rel"), ("man", "obj"), ("2", "obj")])
    ]
    predictions = ["Left.", "The man", "two"]
    gqa = run(ExactMatchAccuracy(), predictions, rows)  # LLaVA's GQA rule: lower case, trailing "." off
    assert float(gqa["accuracy"]) == pytest.approx(1 / 3)
    assert plain(gqa["accuracy_by_task"]) == {"obj": 0.0, "rel": 1.0}
    vqa = run(ExactMatchAccuracy(normalization="vqa"), predictions, rows)  # articles, number words too
    assert float(vqa["accuracy"]) == 1.0
    assert float(run(ExactMatchAccuracy(normalization="none"), ["left", "Left"], rows[:1] * 2)["accuracy"]) == 1.0
    with pytest.raises(ValueError, match="normalization"):
        ExactMatchAccuracy(normalization="fuzzy")


# ----------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("No, there is not.", "no"),
        ("Yes, there is a dog. No cat.", "yes"),  # only the first sentence counts
        ("There is no dog", "no"),
        ("I do not see one", "no"),
        ("NO", "yes"),  # eval_pope.py looks for "No", "no", "not" only
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_parse_pope_answer(text, expected):
    assert parse_pope_answer(text) == expected


POPE_ROWS = [
    {"id": i, "task": task, "answer": label}
    for i, (task, label) in enumerate(
        [("random", "yes"), ("random", "yes"), ("random", "no"), ("random", "no")]
        + [("adversarial", "yes"), ("adversarial", "yes"), ("adversarial", "yes"), ("adversarial", "no")]
    )
]
POPE_PREDICTIONS = [
    "Yes", "No, there is not.", "no", "Yes, there is.",  # random: TP FN TN FP
    "yes", "Yes.", "There is no cat.", "I think not",  # adversarial: TP TP FN TN
]  # fmt: skip


def test_pope_metrics_on_a_small_table():
    result = plain(run(POPEMetrics(), POPE_PREDICTIONS, POPE_ROWS))
    # all 8: TP 3, FP 1, TN 2, FN 2 -> accuracy 5/8, precision 3/4, recall 3/5,
    # F1 = 2 (3/4)(3/5) / (3/4 + 3/5) = 0.9 / 1.35 = 2/3, yes-ratio 4/8.
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["yes_ratio"] == pytest.approx(1 / 2)
    # random: TP 1 FN 1 TN 1 FP 1 -> all 1/2. adversarial: TP 2 FN 1 TN 1 FP 0 -> accuracy 3/4,
    # precision 1, recall 2/3, F1 = 2 (2/3) / (5/3) = 0.8, yes-ratio 2/4.
    assert result["accuracy_by_task"] == pytest.approx({"adversarial": 0.75, "random": 0.5})
    assert result["precision_by_task"] == pytest.approx({"adversarial": 1.0, "random": 0.5})
    assert result["recall_by_task"] == pytest.approx({"adversarial": 2 / 3, "random": 0.5})
    assert result["f1_by_task"] == pytest.approx({"adversarial": 0.8, "random": 0.5})
    assert result["yes_ratio_by_task"] == pytest.approx({"adversarial": 0.5, "random": 0.5})
    assert result["f1_mean"] == pytest.approx(0.65) and result["accuracy_mean"] == pytest.approx(0.625)


def test_pope_undefined_ratios_are_zero():
    result = plain(run(POPEMetrics(), ["no", "no"], [{"id": 1, "answer": "no"}, {"id": 2, "answer": "yes"}]))
    assert result["precision"] == 0.0 and result["f1"] == 0.0 and result["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes", "yes"), ("no", "no"), ("No.", "no"), ("Yes, it is", "yes"), ("It is", "other"), ("I'm not", "other")],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def mme_rows():
    def row(i, task, image, answer):
        return {"id": f"{task}/{image}/{i}", "task": task, "answer": answer, "meta": {"image_id": image}}

    return [
        row(0, "existence", "im1.jpg", "Yes"), row(1, "existence", "im1.jpg", "No"),
        row(2, "existence", "im2.jpg", "Yes"), row(3, "existence", "im2.jpg", "No"),
        row(4, "existence", "im3.jpg", "Yes"), row(5, "existence", "im3.jpg", "No"),
        row(6, "code_reasoning", "im4.png", "Yes"), row(7, "code_reasoning", "im4.png", "No"),
    ]  # fmt: skip


MME_PREDICTIONS = [
    "Yes", "No",  # im1: both right
    "Yes, there is.", "Yes",  # im2: the "no" question wrong
    "Maybe", "no",  # im3: "other" is wrong
    "yes", "No.",  # im4: both right
]  # fmt: skip


def test_mme_score_on_image_pairs():
    result = plain(run(MMEScore(), MME_PREDICTIONS, mme_rows()))
    # existence: 4 of 6 right, 1 of 3 images fully right -> 100 (2/3 + 1/3) = 100.
    # code_reasoning: 2 of 2, 1 of 1 -> 200. Perception 100, cognition 200.
    assert result["accuracy_by_task"] == pytest.approx({"code_reasoning": 1.0, "existence": 2 / 3})
    assert result["accuracy_plus_by_task"] == pytest.approx({"code_reasoning": 1.0, "existence": 1 / 3})
    assert result["score_by_task"] == pytest.approx({"code_reasoning": 200.0, "existence": 100.0})
    assert result["perception"] == pytest.approx(100.0) and result["cognition"] == pytest.approx(200.0)
    assert result["score"] == pytest.approx(300.0) and result["accuracy"] == pytest.approx(6 / 8)


def test_mme_checks_its_inputs():
    good = {"id": 1, "task": "OCR", "answer": "yes", "meta": {"image_id": "a.jpg"}}
    assert plain(run(MMEScore(), ["yes"], [{**good, "task": "ocr"}]))["perception"] == 200.0  # case tolerated
    with pytest.raises(ValueError, match="not an MME subtask"):
        MMEScore().update(["yes"], batch([{**good, "task": "weather"}]))
    with pytest.raises(ValueError, match="image_id"):
        MMEScore().update(["yes"], batch([{**good, "meta": {}}]))
    with pytest.raises(ValueError, match="yes or no"):
        MMEScore().update(["yes"], batch([{**good, "answer": "maybe"}]))


# ----------------------------------------------------------------------------------------------
# Multiple choice and circular evaluation
# ----------------------------------------------------------------------------------------------

FOUR = ("a cat", "a dog", "a bird", "a fish")


@pytest.mark.parametrize(
    ("prediction", "options", "expected"),
    [
        ("A", FOUR, "A"),
        ("B.", FOUR, "B"),  # eval_mmbench.py strips periods and upper-cases
        ("c", FOUR, "C"),
        ("D. a fish", FOUR, "D"),  # eval_science_qa.py: "X. "
        ("The answer is C.", FOUR, "C"),
        ("I think the answer is (B)", FOUR, "B"),
        ("The answer is Apple", FOUR, None),  # not a letter on its own
        ("E", FOUR, None),  # only four options
        ("E", (), "E"),  # no options given: any capital
        ("dog", FOUR, "B"),  # eval_mmbench.py: the answer is in exactly one option's text
        ("a", ("cat", "dog"), "A"),  # a bare letter wins over text matching
        ("fish or bird", FOUR, None),
        ("", FOUR, None),
    ],
)
def test_parse_option_letter(prediction, options, expected):
    assert parse_option_letter(prediction, options) == expected


def test_parse_option_letter_without_text_matching():
    assert parse_option_letter("dog", FOUR, match_option_text=False) is None


def mc_rows():
    rows = []
    # group g1 (logic): 4 rotations, right answers A..D; g2 (logic): 2 rotations; g3 (ocr): 3 rotations
    for group, task, answers in (("g1", "logic", "ABCD"), ("g2", "logic", "AB"), ("g3", "ocr", "CAB")):
        for k, answer in enumerate(answers):
            meta = {"index": f"{group}-{k}", "circular": group}
            rows.append({"id": f"{group}-{k}", "task": task, "answer": answer, "options": FOUR, "meta": meta})
    return rows


MC_PREDICTIONS = [
    "A", "B.", "The answer is C.", "d",  # g1: all right
    "A", "C",  # g2: second wrong
    "a bird", "A", "B. a dog",  # g3: all right ("a bird" is option C's text)
]  # fmt: skip


def test_multiple_choice_accuracy_plain_and_circular():
    plain_result = plain(run(MultipleChoiceAccuracy(), MC_PREDICTIONS, mc_rows()))
    # 8 of 9 questions right; logic 5 of 6, ocr 3 of 3.
    assert plain_result["accuracy"] == pytest.approx(8 / 9)
    assert plain_result["accuracy_by_task"] == pytest.approx({"logic": 5 / 6, "ocr": 1.0})
    circular = plain(run(MultipleChoiceAccuracy(circular=True), MC_PREDICTIONS, mc_rows()))
    # groups: g1 right, g2 wrong (one rotation wrong), g3 right -> 2 of 3; logic 1 of 2, ocr 1 of 1.
    assert circular["accuracy"] == pytest.approx(2 / 3)
    assert circular["accuracy_by_task"] == pytest.approx({"logic": 0.5, "ocr": 1.0})
    assert circular["question_accuracy"] == pytest.approx(8 / 9) and circular["groups"] == 3


def test_circular_groups_fall_back_to_index_then_id():
    rows = [{"id": "q1", "answer": "A", "meta": {"index": 7}}, {"id": "q2", "answer": "B", "meta": {"index": 7}}]
    rows.append({"id": "q3", "answer": "A"})
    result = plain(run(MultipleChoiceAccuracy(circular=True), ["A", "A", "A"], rows))
    assert result["groups"] == 2 and result["accuracy"] == 0.5  # group 7 has a wrong rotation; q3 alone


# ----------------------------------------------------------------------------------------------
# Loyalty
# ----------------------------------------------------------------------------------------------


def test_loyalty_from_meta_and_from_constructor():
    rows = [{"id": i, "answer": "x", "task": t} for i, t in enumerate(["count", "color", "color"])]
    predictions = ["Two", "yes", "red"]
    references = {"0": "2", "1": "Yes.", "2": "blue"}  # "Two" = "2" and "yes" = "Yes." once normalised
    result = plain(run(Loyalty(references=references), predictions, rows))
    assert result["loyalty"] == result["accuracy"] == pytest.approx(2 / 3)
    assert result["accuracy_by_task"] == pytest.approx({"color": 0.5, "count": 1.0})
    in_meta = [{**row, "meta": {"reference": references[str(row["id"])]}} for row in rows]
    assert plain(run(Loyalty(), predictions, in_meta))["loyalty"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no reference answer for question 0"):
        Loyalty().update(predictions, batch(rows))


# ----------------------------------------------------------------------------------------------
# Shared behaviour: skipped rows, bad input, reset, merging as DDP does
# ----------------------------------------------------------------------------------------------


def test_skipped_rows_are_left_out_and_lengths_checked():
    metric = VQAv2Accuracy()
    rows = batch(VQA_ROWS[:2])
    rows["skipped"] = [False, True]
    metric.update(["Two", "garbage"], rows)
    assert int(metric.compute()["total"]) == 1 and float(metric.compute()["accuracy"]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"2 predictions but batch\['id'\] has 1 entries"):
        metric.update(["a", "b"], batch(VQA_ROWS[:1]))


def test_reset_and_empty_compute():
    metric = POPEMetrics()
    run(metric, POPE_PREDICTIONS, POPE_ROWS)
    metric.reset()
    result = metric.compute()
    assert math.isnan(float(result["accuracy"])) and result["accuracy_by_task"] == {} and int(result["total"]) == 0
    assert plain(run(metric, POPE_PREDICTIONS, POPE_ROWS))["f1"] == pytest.approx(2 / 3)  # names stored again


CASES = {
    "vqav2": (lambda: VQAv2Accuracy(), VQA_PREDICTIONS, VQA_ROWS),
    "exact": (lambda: ExactMatchAccuracy(normalization="vqa"), VQA_PREDICTIONS, VQA_ROWS),
    "pope": (lambda: POPEMetrics(), POPE_PREDICTIONS, POPE_ROWS),
    "mme": (lambda: MMEScore(), MME_PREDICTIONS, mme_rows()),
    "mc": (lambda: MultipleChoiceAccuracy(), MC_PREDICTIONS, mc_rows()),
    "mc_circular": (lambda: MultipleChoiceAccuracy(circular=True), MC_PREDICTIONS, mc_rows()),
    "loyalty": (
        lambda: Loyalty(references={str(r["id"]): r["answer"] for r in VQA_ROWS}),
        VQA_PREDICTIONS,
        VQA_ROWS,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_halves_merged_equal_the_whole(case):
    make, predictions, rows = CASES[case]
    whole = plain(run(make(), predictions, rows))
    # Contiguous halves, and the interleaved split of a DistributedSampler (which puts the two
    # questions of an MME image and the rotations of an MMBench group on different processes).
    for first, second in (
        (slice(0, len(rows) // 2), slice(len(rows) // 2, None)),
        (slice(0, None, 2), slice(1, None, 2)),
    ):
        a, b = make(), make()
        feed(a, predictions[first], rows[first], batch_size=2)
        feed(b, predictions[second], rows[second], batch_size=2)
        a.merge_state(b)  # applies each state's dist_reduce_fx ("cat"), as a DDP sync does
        assert close(plain(a.compute()), whole)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_padding_is_counted_once(case):
    # A DistributedSampler evens out processes by repeating the first questions: same (task, id) rows.
    make, predictions, rows = CASES[case]
    whole = plain(run(make(), predictions, rows))
    padded = make()
    run(padded, predictions + predictions[:2], rows + rows[:2])
    result = plain(padded.compute())
    assert result.pop("duplicates") == 2 and whole.pop("duplicates") == 0
    assert close(result, whole)


def test_dedup_can_be_turned_off():
    metric = VQAv2Accuracy(dedup=False)
    result = run(metric, VQA_PREDICTIONS + VQA_PREDICTIONS[:1], VQA_ROWS + VQA_ROWS[:1])
    assert int(result["total"]) == 7 and float(result["accuracy"]) == pytest.approx((4.8 + 0.6) / 7)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    from lightning_modules import benchmark_metrics as bm

    rank, port, data = int(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for name, (cls, kwargs, predictions, rows) in data.items():
        metric = getattr(bm, cls)(**kwargs)
        # DistributedSampler(shuffle=False): pad to an even length by repeating the first rows, then
        # rank r takes rows r, r + 2, ...
        n = len(rows) + len(rows) % 2
        predictions, rows = (predictions * 2)[:n][rank::2], (rows * 2)[:n][rank::2]
        for start in range(0, len(rows), 2):
            part = rows[start : start + 2]
            keys = ("id", "answer", "task", "answers", "options", "meta")
            batch = {key: [row.get(key) for row in part] for key in keys}
            metric.update(predictions[start : start + 2], batch)
        value = metric.compute()  # syncs over the process group
        results[name] = json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else v))
    if rank == 0:
        json.dump(results, open(sys.argv[3] + ".out", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # ~10 s: two fresh interpreters import torch and torchmetrics
def test_real_ddp_sync_over_two_gloo_processes(tmp_path):
    """Two gloo processes, each updating with its DistributedSampler share, compute what one process does.

    `compute()` gathers the list states over the process group (torchmetrics' real sync path, where a
    list state becomes one tensor), so this checks what `merge_state` above only imitates.
    """
    specs = {
        "vqav2": ("VQAv2Accuracy", {}, VQA_PREDICTIONS, VQA_ROWS),
        "pope": ("POPEMetrics", {}, POPE_PREDICTIONS, POPE_ROWS),
        "mme": ("MMEScore", {}, MME_PREDICTIONS, mme_rows()),
        "mc_circular": ("MultipleChoiceAccuracy", {"circular": True}, MC_PREDICTIONS, mc_rows()),
    }
    data = tmp_path / "data.json"
    data.write_text(json.dumps(specs))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), port, str(data), str(ROOT)], stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    errors = [w.communicate(timeout=120)[1].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), errors
    synced = json.loads((tmp_path / "data.json.out").read_text())
    for name, (cls, kwargs, predictions, rows) in specs.items():
        single = plain(run(getattr(bm, cls)(**kwargs), predictions, rows))
        got = {k: v for k, v in synced[name].items() if k != "duplicates"}
        single.pop("duplicates")
        assert close(plain_json(got), single), name


def plain_json(value):
    if isinstance(value, dict):
        return {key: plain_json(v) for key, v in value.items()}
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def test_states_are_tensors_or_lists_of_tensors():
    metric = MMEScore()
    run(metric, MME_PREDICTIONS, mme_rows())
    for name in metric._defaults:
        state = getattr(metric, name)
        assert isinstance(state, list) and all(isinstance(t, torch.Tensor) for t in state), name
