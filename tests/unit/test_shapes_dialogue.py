"""Training conversations (`data.shapes_dialogue`): every derived answer is true of its scene."""

from collections import Counter

from data.shapes import make_sample
from data.shapes_dialogue import conversation, scene_questions
from data.shapes_questions import NUMBERS, PLURALS
from data.shapes_scene import side_of

SHAPE_OF_PLURAL = {plural: shape for shape, plural in PLURALS.items()}


def check(sample, task: str, question: str, answer: str) -> None:
    """Answer `question` from the scene's objects, independently of the deriving code."""
    words = question.split()
    objects = sample.objects
    if task == "color":
        named = [o for o in objects if o.shape == words[4]]
        assert len(named) == 1 and named[0].color == answer, question
    elif task == "shape":
        named = [o for o in objects if o.color == words[4]]
        assert len(named) == 1 and named[0].shape == answer, question
    elif task == "count":
        shape = SHAPE_OF_PLURAL.get(words[2])
        n = sum(o.shape == shape if shape else o.color == words[2] for o in objects)
        assert NUMBERS[n] == answer, question
    elif task == "exist":
        present = any((o.color, o.shape) == (words[3], words[4]) for o in objects)
        assert answer == ("yes" if present else "no"), question
    elif task == "spatial":
        (a,), (b,) = ([o for o in objects if o.shape == words[3]], [o for o in objects if o.shape == words[7]])
        assert side_of(a, b) == answer, question
    else:
        assert task == "read" and answer == sample.text.text.lower(), question
        if words[3] == "on":
            carriers = [o for o in objects if o.shape == words[5]]
            assert len(carriers) == 1 and carriers[0] is objects[sample.text.target], question


def test_every_derived_question_is_true_of_its_scene():
    tasks = Counter()
    for index in range(60):
        sample = make_sample(0, "train", index)
        for task, pairs in scene_questions(sample).items():
            for question, answer in pairs:
                check(sample, task, question, answer)
                tasks[task] += 1
    assert set(tasks) == {"color", "shape", "count", "exist", "spatial", "read"}


def test_conversation_starts_with_the_planned_question_and_balances_answers():
    counts = Counter()
    for index in range(150):
        sample = make_sample(0, "train", index)
        turns = conversation(sample, 8, seed=index)
        assert turns[0] == (sample.question, sample.answer)
        assert len(turns) == 8 and len(set(q for q, _ in turns)) == 8
        assert turns == conversation(sample, 8, seed=index)
        counts.update(a for q, a in turns[1:] if q.startswith("how many"))
    # Most of the 13 colours and shapes are absent from a scene, so drawing a count question
    # uniformly would answer "zero" about half the time; answer-first makes it one of a few.
    assert counts["zero"] < 0.45 * sum(counts.values())


def test_one_turn_is_the_planned_question_alone():
    sample = make_sample(0, "val", 3)
    assert conversation(sample, 1, seed=0) == [(sample.question, sample.answer)]
