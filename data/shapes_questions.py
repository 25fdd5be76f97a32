"""Question families of the shapes benchmark.

Every family is planned answer-first: the caller picks the answer (balanced, see `data.shapes`), and
the planner builds a scene that makes it true. So the question text alone says nothing about the
answer, and a text-only guesser is at chance. Planners only choose objects and constraints;
`data.shapes_scene.layout` then places them.

Questions are lowercase words separated by single spaces, with "?" as its own word
("what color is the star ?"), so whitespace splitting and a `\\w+|[^\\w\\s]+` pre-tokenizer agree.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from data.shapes_scene import COLORS, CORNERS, SHAPES, TEXTS, Obj, Text

FAMILIES = ["color", "shape", "count", "exist", "spatial", "read"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
SIDES = ["left", "right", "above", "below"]
POPE_TYPES = ["random", "popular", "adversarial"]
MAX_OBJECTS = 6
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds"}  # fmt: skip
TEMPLATE_WORDS = "what color is the shape object how many are there objects a an where relative to written on in corner"

CATEGORIES = [(c, s) for c in COLORS for s in SHAPES]
# POPE's "popular" negatives are absent objects among the dataset's most frequent ones. Here the
# frequency is by design: distractor objects come half the time from this list, so these eight are
# each about five times as common as any other (colour, shape) pair.
POPULAR = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
           ("purple", "cross"), ("orange", "diamond"), ("cyan", "circle"), ("blue", "triangle")]  # fmt: skip

# The answer keys of each family, which `data.shapes` balances. For `exist` a key is (pope type, yes/no).
ANSWER_KEYS: dict[str, list] = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "count": NUMBERS,
    "exist": [(p, yn) for p in POPE_TYPES for yn in ("yes", "no")],
    "spatial": SIDES,
    "read": TEXTS,
}


@dataclasses.dataclass
class Plan:
    """A question, its answer, and the scene that makes the answer true (not yet laid out)."""

    task: str
    question: str
    answer: str
    objects: list[Obj]
    pope: str | None = None  # exist only: the POPE setting the question belongs to
    relation: tuple[int, int, str] | None = None  # spatial only: objects[a] is `side` of objects[b]
    text: Text | None = None


def distractor(rng: random.Random, allowed: Callable[[str, str], bool]) -> Obj:
    """An object from the dataset's prior (half POPULAR, half uniform) that `allowed` accepts."""
    while True:
        color, shape = rng.choice(POPULAR if rng.random() < 0.5 else CATEGORIES)
        if allowed(color, shape):
            return Obj(color, shape)


def fill(rng: random.Random, objects: list[Obj], allowed: Callable[[str, str], bool]) -> list[Obj]:
    """Add distractors up to a total drawn from [max(2, len(objects)), MAX_OBJECTS]; shuffled."""
    total = rng.randint(max(2, len(objects)), MAX_OBJECTS)
    objects = objects + [distractor(rng, allowed) for _ in range(total - len(objects))]
    rng.shuffle(objects)
    return objects


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plan_color(rng: random.Random, color: str) -> Plan:
    shape = rng.choice(SHAPES)
    objects = fill(rng, [Obj(color, shape)], lambda c, s: s != shape)  # the named shape is unique
    return Plan("color", f"what color is the {shape} ?", color, objects)


def plan_shape(rng: random.Random, shape: str) -> Plan:
    color = rng.choice(list(COLORS))
    objects = fill(rng, [Obj(color, shape)], lambda c, s: c != color)  # the named colour is unique
    return Plan("shape", f"what shape is the {color} object ?", shape, objects)


def plan_count(rng: random.Random, number: str) -> Plan:
    k = NUMBERS.index(number)
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        counted = [distractor(rng, lambda c, s: s == shape) for _ in range(k)]
        objects = fill(rng, counted, lambda c, s: s != shape)
        question = f"how many {PLURALS[shape]} are there ?"
    else:
        color = rng.choice(list(COLORS))
        counted = [distractor(rng, lambda c, s: c == color) for _ in range(k)]
        objects = fill(rng, counted, lambda c, s: c != color)
        question = f"how many {color} objects are there ?"
    return Plan("count", question, number, objects)


def plan_exist(rng: random.Random, key: tuple[str, str]) -> Plan:
    """POPE-style: the asked object is drawn from the setting's pool whatever the answer, so the
    question never tells the answer; "no" scenes lack it, "yes" scenes hold it.

    random: any (colour, shape) pair; popular: one of POPULAR; adversarial: any pair, and the scene
    (yes or no) holds a look-alike sharing its shape or its colour, so only binding colour to shape
    answers it.
    """
    pope, answer = key
    color, shape = rng.choice(POPULAR if pope == "popular" else CATEGORIES)
    objects = [Obj(color, shape)] if answer == "yes" else []
    if pope == "adversarial":
        if rng.random() < 0.5:
            objects.append(Obj(rng.choice([c for c in COLORS if c != color]), shape))
        else:
            objects.append(Obj(color, rng.choice([s for s in SHAPES if s != shape])))
    objects = fill(rng, objects, lambda c, s: (c, s) != (color, shape))
    question = f"is there {article(color)} {color} {shape} ?"
    return Plan("exist", question, answer, objects, pope=pope)


def plan_spatial(rng: random.Random, side: str) -> Plan:
    a, b = rng.sample(SHAPES, 2)
    pair = [Obj(rng.choice(list(COLORS)), a), Obj(rng.choice(list(COLORS)), b)]
    # Other objects never repeat the two named shapes, so "the circle" means one object.
    others = [distractor(rng, lambda c, s: s not in (a, b)) for _ in range(rng.randint(0, MAX_OBJECTS - 2))]
    return Plan("spatial", f"where is the {a} relative to the {b} ?", side, pair + others, relation=(0, 1, side))


def plan_read(rng: random.Random, code: str) -> Plan:
    if rng.random() < 0.5:
        text = Text(code, "corner", rng.choice(CORNERS))
        objects = fill(rng, [], lambda c, s: True)
        question = "what is written in the corner ?"
    else:
        shape = rng.choice(SHAPES)
        objects = fill(rng, [Obj(rng.choice(list(COLORS)), shape)], lambda c, s: s != shape)
        target = next(i for i, o in enumerate(objects) if o.shape == shape)
        text = Text(code, "object", target)
        question = f"what is written on the {shape} ?"
    return Plan("read", question, code.lower(), objects, text=text)


PLANNERS: dict[str, Callable[[random.Random, object], Plan]] = {
    "color": plan_color,
    "shape": plan_shape,
    "count": plan_count,
    "exist": plan_exist,
    "spatial": plan_spatial,
    "read": plan_read,
}


def vocabulary() -> list[str]:
    """Every word a question or answer can hold, "?" included, sorted."""
    words = set(TEMPLATE_WORDS.split()) | {"?", "yes", "no"}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(NUMBERS) | set(SIDES)
    words |= {t.lower() for t in TEXTS}
    return sorted(words)
