"""VQAAccuracy: normalisation and values on hand-computed answer sets."""

import math

import pytest

from lightning_modules.metrics import VQAAccuracy, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Red", "red"), ("  red. ", "red"), ("The Red!", "the red"), ("two\n", "two"), ("a,b", "a b"), ("", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_overall_and_per_task_accuracy():
    metric = VQAAccuracy(tasks=["color", "count", "shape"])
    metric.update(["Red.", "blue", "two"], {"answer": ["red", "green", "two"], "task": ["color", "color", "count"]})
    metric.update(["circle ", "square"], {"answer": ["Circle", "triangle"], "task": ["shape", "shape"]})
    result = metric.compute()
    # 3 of 5 right: color 1/2, count 1/1, shape 1/2
    assert float(result["accuracy"]) == pytest.approx(3 / 5)
    assert {k: float(v) for k, v in result["accuracy_by_task"].items()} == {"color": 0.5, "count": 1.0, "shape": 0.5}


def test_tasks_without_samples_are_left_out_and_reset_clears():
    metric = VQAAccuracy(tasks=["color", "ocr"])
    metric.update(["red"], {"answer": ["red"], "task": ["color"]})
    assert list(metric.compute()["accuracy_by_task"]) == ["color"]
    metric.reset()
    assert math.isnan(float(metric.compute()["accuracy"]))


def test_without_tasks_only_overall():
    metric = VQAAccuracy()
    metric.update(["yes", "no"], {"answer": ["yes", "yes"]})
    result = metric.compute()
    assert float(result["accuracy"]) == 0.5 and result["accuracy_by_task"] == {}


def test_states_sum_across_processes():
    # merge_state applies each state's dist_reduce_fx, as a DDP sync does.
    a, b = VQAAccuracy(tasks=["color", "shape"]), VQAAccuracy(tasks=["color", "shape"])
    a.update(["red", "blue"], {"answer": ["red", "red"], "task": ["color", "color"]})
    b.update(["circle"], {"answer": ["circle"], "task": ["shape"]})
    a.merge_state(b)
    result = a.compute()
    assert float(result["accuracy"]) == pytest.approx(2 / 3) and int(result["total"]) == 3
    assert float(result["accuracy_by_task"]["shape"]) == 1.0


def test_bad_input_is_rejected():
    metric = VQAAccuracy(tasks=["color"])
    with pytest.raises(ValueError, match="not one of"):
        metric.update(["red"], {"answer": ["red"], "task": ["shape"]})
    with pytest.raises(ValueError, match="same length"):
        metric.update(["red", "blue"], {"answer": ["red"], "task": ["color"]})
