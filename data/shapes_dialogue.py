"""More questions about a scene that is already laid out: the extra turns of a training conversation.

The benchmark plans one question per scene, answer first (`data.shapes_questions`). For training,
LLaVA's instruction data holds several question-answer turns about one image; here the extra turns
are read off the finished scene, so every answer is true by construction, and a step pays for the
576 visual tokens once but learns from several answers. Only questions that the benchmark itself
could ask are derived: a named object is always unique in its scene, spatial pairs are always clear
(`side_of`), counts stay within NUMBERS.
"""

from __future__ import annotations

import random
from collections import Counter

from data.shapes import Sample
from data.shapes_questions import NUMBERS, PLURALS, POPULAR, article
from data.shapes_scene import COLORS, SHAPES, side_of


def _color_questions(sample: Sample) -> list[tuple[str, str, str]]:
    shapes = Counter(o.shape for o in sample.objects)
    return [("color", f"what color is the {o.shape} ?", o.color) for o in sample.objects if shapes[o.shape] == 1]


def _shape_questions(sample: Sample) -> list[tuple[str, str, str]]:
    colors = Counter(o.color for o in sample.objects)
    return [("shape", f"what shape is the {o.color} object ?", o.shape) for o in sample.objects if colors[o.color] == 1]


def _count_questions(sample: Sample) -> list[tuple[str, str, str]]:
    shapes = Counter(o.shape for o in sample.objects)
    colors = Counter(o.color for o in sample.objects)
    out = [
        ("count", f"how many {PLURALS[s]} are there ?", NUMBERS[shapes[s]]) for s in SHAPES if shapes[s] < len(NUMBERS)
    ]
    out += [
        ("count", f"how many {c} objects are there ?", NUMBERS[colors[c]]) for c in COLORS if colors[c] < len(NUMBERS)
    ]
    return out


def _exist_questions(sample: Sample) -> list[tuple[str, str, str]]:
    present = {(o.color, o.shape) for o in sample.objects}
    asked = present | set(POPULAR) | {(o.color, s) for o in sample.objects for s in SHAPES}
    asked |= {(c, o.shape) for o in sample.objects for c in COLORS}  # adversarial look-alikes
    return [
        ("exist", f"is there {article(c)} {c} {s} ?", "yes" if (c, s) in present else "no") for c, s in sorted(asked)
    ]


def _spatial_questions(sample: Sample) -> list[tuple[str, str, str]]:
    shapes = Counter(o.shape for o in sample.objects)
    unique = [o for o in sample.objects if shapes[o.shape] == 1]
    out = []
    for a in unique:
        for b in unique:
            side = side_of(a, b) if a is not b else None
            if side is not None:
                out.append(("spatial", f"where is the {a.shape} relative to the {b.shape} ?", side))
    return out


def _read_questions(sample: Sample) -> list[tuple[str, str, str]]:
    text = sample.text
    if text is None:
        return []
    if text.where == "corner":
        return [("read", "what is written in the corner ?", text.text.lower())]
    carrier = sample.objects[int(text.target)]
    if sum(o.shape == carrier.shape for o in sample.objects) != 1:
        return []
    return [("read", f"what is written on the {carrier.shape} ?", text.text.lower())]


DERIVERS = [_color_questions, _shape_questions, _count_questions, _exist_questions, _spatial_questions, _read_questions]


def scene_questions(sample: Sample) -> dict[str, list[tuple[str, str]]]:
    """Every question the benchmark's families could ask about `sample`'s scene, by family:
    {task: [(question, answer), ...]}; families with nothing to ask are left out."""
    out: dict[str, list[tuple[str, str]]] = {}
    for derive in DERIVERS:
        for task, question, answer in derive(sample):
            out.setdefault(task, []).append((question, answer))
    return out


def conversation(sample: Sample, turns: int, seed: int) -> list[tuple[str, str]]:
    """`turns` (question, answer) pairs about `sample`'s scene: the planned question first (so the first
    turn, the one evaluated, keeps the benchmark's balance), then derived ones, each from a family
    drawn at random among those with questions left (so common families do not crowd out rare ones).

    Within a family the answer is drawn first, uniformly among those the scene allows.
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    rng = random.Random(seed)
    pool = {task: [qa for qa in qas if qa[0] != sample.question] for task, qas in scene_questions(sample).items()}
    chosen = [(sample.question, sample.answer)]
    while len(chosen) < turns:
        tasks = [t for t, qas in pool.items() if qas]
        if not tasks:
            break
        qas = pool[rng.choice(tasks)]
        # Answer first, then a question with that answer: derived counts are mostly "zero" and
        # exist questions mostly "no", and a skewed answer prior is what a blind model would learn.
        answer = rng.choice(sorted({a for _, a in qas}))
        pick = rng.choice([qa for qa in qas if qa[1] == answer])
        qas.remove(pick)
        chosen.append(pick)
    return chosen
