"""The shapes benchmark generator: determinism, balance, POPE negatives, geometry, legible labels."""

import collections
import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.jsonl import read_questions
from data.shapes import FAMILIES, POPE_TYPES, POPULAR, main, make_sample, vocabulary, write_split
from data.shapes_questions import ANSWER_KEYS, PLURALS
from data.shapes_scene import ALPHABET, IMAGE_SIZE, font

N = 600  # 100 questions per family; planning without drawing takes milliseconds


@pytest.fixture(scope="module")
def samples():
    return [make_sample(0, "test", i) for i in range(N)]


def by_task(samples, task):
    return [s for s in samples if s.task == task]


def with_shape(sample, shape):
    return [o for o in sample.objects if o.shape == shape]


def with_color(sample, color):
    return [o for o in sample.objects if o.color == color]


# ---- determinism, format ------------------------------------------------------------------------


def test_same_seed_same_bytes_and_records():
    for index in (0, 1, 2, 3, 4, 5):
        a, b = make_sample(0, "test", index), make_sample(0, "test", index)
        assert a.record("x.png") == b.record("x.png")
        assert a.image().tobytes() == b.image().tobytes()


def test_other_seed_or_split_differs():
    base = [make_sample(0, "test", i) for i in range(6)]
    for other in ([make_sample(1, "test", i) for i in range(6)], [make_sample(0, "train", i) for i in range(6)]):
        assert [s.question for s in other] != [s.question for s in base]
        assert all(o.image().tobytes() != s.image().tobytes() for o, s in zip(other[:2], base[:2]))


def test_image_is_336_rgb():
    image = make_sample(0, "val", 0).image()
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) == (336, 336) and image.mode == "RGB"


def test_write_split_layout_is_read_back_and_deterministic(tmp_path):
    root = write_split(tmp_path / "a", "val", n=6, seed=3)
    main(["--out", str(tmp_path / "b"), "--split", "val", "--n", "6", "--seed", "3"])
    records = read_questions(root)
    assert [r.id for r in records] == [f"val-{i:06d}" for i in range(6)]
    for r in records:
        assert Image.open(r.image).size == (336, 336)
        assert (tmp_path / "b" / "val" / r.image.relative_to(root)).read_bytes() == r.image.read_bytes()
    assert (root / "questions.jsonl").read_text() == (tmp_path / "b" / "val" / "questions.jsonl").read_text()
    lines = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    assert all(("pope" in row) == (row["task"] == "exist") for row in lines)
    assert json.loads((root / "info.json").read_text())["n"] == 6


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        make_sample(0, "dev", 0)


# ---- shares and balance -------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 5000])  # the start of a split, and a window further in
def test_families_fair_and_answers_balanced(start):
    window = [make_sample(0, "train", i) for i in range(start, start + N)]
    shares = collections.Counter(s.task for s in window)
    assert set(shares) == set(FAMILIES)
    assert all(abs(n - N / len(FAMILIES)) <= 2 for n in shares.values()), shares
    for family in FAMILIES:
        questions = by_task(window, family)
        answers = collections.Counter(s.answer for s in questions)
        if family == "exist":
            answers = collections.Counter((s.pope, s.answer) for s in questions)
        expected = len(questions) / len(ANSWER_KEYS[family])
        assert len(answers) == len(ANSWER_KEYS[family]), (family, answers)
        assert all(abs(n - expected) <= max(2, 0.2 * expected) for n in answers.values()), (family, answers)


def test_about_a_third_of_scenes_carry_text(samples):
    share = sum(s.text is not None for s in samples) / len(samples)
    assert 0.25 <= share <= 0.42, share


def test_every_word_is_in_the_vocabulary(samples):
    vocab = set(vocabulary())
    for s in samples:
        # The tokenizer's pre-tokenizer (`tokenizers` Whitespace) splits on \w+|[^\w\s]+.
        assert re.findall(r"\w+|[^\w\s]+", s.question) == s.question.split()
        assert set(s.question.split()) <= vocab, s.question
        assert s.answer in vocab and s.answer == s.answer.lower() and len(s.answer.split()) == 1


# ---- scene geometry -----------------------------------------------------------------------------


def test_objects_do_not_overlap_and_span_sizes(samples):
    sizes = []
    for s in samples:
        boxes = [o.box for o in s.objects] + ([s.text.box] if s.text and s.text.where == "corner" else [])
        assert 2 <= len(s.objects) <= 6
        for k, a in enumerate(boxes):
            assert 0 <= a[0] and 0 <= a[1] and a[2] <= IMAGE_SIZE and a[3] <= IMAGE_SIZE
            for b in boxes[k + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (s.id, a, b)
        sizes += [o.size for o in s.objects]
    assert min(sizes) < 14 and max(sizes) >= 3 * 14  # from under one patch to several patches


def test_color_names_a_unique_object(samples):
    for s in by_task(samples, "color"):
        named = with_shape(s, s.question.split()[4])
        assert len(named) == 1 and named[0].color == s.answer, s


def test_shape_names_a_unique_object(samples):
    for s in by_task(samples, "shape"):
        named = with_color(s, s.question.split()[4])
        assert len(named) == 1 and named[0].shape == s.answer, s


def test_count_is_right(samples):
    numbers = ["zero", "one", "two", "three", "four", "five"]
    plural_to_shape = {p: shape for shape, p in PLURALS.items()}
    for s in by_task(samples, "count"):
        word = s.question.split()[2]
        found = with_shape(s, plural_to_shape[word]) if word in plural_to_shape else with_color(s, word)
        assert numbers[len(found)] == s.answer, s


def test_spatial_answers_are_geometrically_right(samples):
    for s in by_task(samples, "spatial"):
        words = s.question.split()  # where is the A relative to the B ?
        (a,), (b,) = with_shape(s, words[3]), with_shape(s, words[7])
        (ax, ay), (bx, by) = a.center, b.center
        dx, dy = ax - bx, ay - by
        horizontal = abs(dx) >= 2 * abs(dy)
        vertical = abs(dy) >= 2 * abs(dx)
        clear = {  # a patch of space between the boxes on the asked axis, and that axis clearly dominates
            "left": horizontal and a.box[2] + 14 <= b.box[0],
            "right": horizontal and a.box[0] >= b.box[2] + 14,
            "above": vertical and a.box[3] + 14 <= b.box[1],
            "below": vertical and a.box[1] >= b.box[3] + 14,
        }
        assert [side for side, ok in clear.items() if ok] == [s.answer], s


def test_read_targets_are_right(samples):
    for s in by_task(samples, "read"):
        assert s.answer == s.text.text.lower()
        if s.question == "what is written in the corner ?":
            assert s.text.where == "corner"
        else:
            (carrier,) = with_shape(s, s.question.split()[5])
            assert s.text.where == "object" and s.objects[s.text.target] is carrier


# ---- POPE negatives -----------------------------------------------------------------------------


def test_exist_follows_pope():
    window = [make_sample(0, "train", i) for i in range(1800)]
    questions = by_task(window, "exist")
    assert {s.pope for s in questions} == set(POPE_TYPES)
    for pope in POPE_TYPES:
        answers = collections.Counter(s.answer for s in questions if s.pope == pope)
        assert set(answers) == {"yes", "no"} and abs(answers["yes"] - answers["no"]) <= 2, (pope, answers)
    for s in questions:
        color, shape = s.question.split()[3:5]
        present = {(o.color, o.shape) for o in s.objects}
        assert ((color, shape) in present) == (s.answer == "yes"), s
        if s.pope == "popular":
            assert (color, shape) in POPULAR
        if s.pope == "adversarial":  # a look-alike sharing exactly one attribute is in the scene
            assert any((c == color) != (sh == shape) for c, sh in present), s
    # "popular" means the most frequent objects of the dataset: check that on the data itself.
    counts = collections.Counter((o.color, o.shape) for s in window for o in s.objects)
    assert {k for k, _ in counts.most_common(len(POPULAR))} == set(POPULAR)


# ---- legibility of the labels -------------------------------------------------------------------


def inkness(pixels: np.ndarray) -> np.ndarray:
    """Grey-level distance from the label's paper (its median), 0..1, whatever the polarity."""
    grey = pixels.astype(np.float32).mean(axis=2)
    return np.abs(grey - np.median(grey)) / 255


def template(char: str, size: int) -> np.ndarray:
    """`char` drawn once, black on white, at font `size`, cropped to its ink."""
    canvas = Image.new("RGB", (4 * size, 2 * size), "white")
    ImageDraw.Draw(canvas).text((size, 0), char, font=font(size), fill="black")
    ink = inkness(np.asarray(canvas)) > 0.5
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return inkness(np.asarray(canvas))[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def best_match(glyph: np.ndarray, size: int) -> tuple[str, float]:
    """The character whose template correlates best with `glyph`, over shifts of up to 2 px."""
    scores = {}
    for char in ALPHABET:
        t = template(char, size)
        h, w = max(glyph.shape[0], t.shape[0]) + 4, max(glyph.shape[1], t.shape[1]) + 4
        g = np.zeros((h, w), np.float32)
        g[2 : 2 + glyph.shape[0], 2 : 2 + glyph.shape[1]] = glyph
        best = -1.0
        for dy in range(h - t.shape[0] + 1):
            for dx in range(w - t.shape[1] + 1):
                p = np.zeros_like(g)
                p[dy : dy + t.shape[0], dx : dx + t.shape[1]] = t
                best = max(best, float(np.corrcoef(g.ravel(), p.ravel())[0, 1]))
        scores[char] = best
    char = max(scores, key=scores.get)
    return char, scores[char]


def read_label(image: Image.Image, box: tuple[int, int, int, int], size: int) -> str:
    """Decode a label from pixels: split its ink into glyphs by empty columns, match each glyph.

    Legible means: ink stands out from the paper by more than a third of the grey range (else no
    glyph is found), each glyph correlates >= 0.8 with its template, and capitals are at least
    11 px tall (most of the 14 px patch each one fills), measured on the pixels.
    """
    ink = inkness(np.asarray(image)[box[1] : box[3], box[0] : box[2]])
    mask = ink > 0.33
    cols = mask.any(0)
    text = ""
    col = 0
    while col < len(cols):
        if not cols[col]:
            col += 1
            continue
        end = col
        while end < len(cols) and cols[end]:
            end += 1
        rows = np.flatnonzero(mask[:, col:end].any(1))
        if rows[-1] - rows[0] + 1 < 11 and not text:  # the first glyph sets the height check
            return ""
        char, score = best_match(ink[rows[0] : rows[-1] + 1, col:end], size)
        text += char if score >= 0.8 else "?"
        col = end
    return text


def labelled(count: int):
    found, index = [], 0
    while len(found) < count:
        s = make_sample(0, "test", index)
        if s.text is not None:
            found.append(s)
        index += 1
    return found


def test_labels_are_legible_at_336():
    scenes = labelled(50)
    assert {s.text.where for s in scenes} == {"corner", "object"}
    assert {s.text.dark_on_light for s in scenes} == {True, False}
    for s in scenes:
        assert read_label(s.image(), s.text.box, s.text.font_size) == s.text.text, s


def test_the_reader_fails_on_illegible_labels():
    """The legibility check has teeth: the same labels, too small or too faint, are not read."""
    scenes = labelled(6)
    for s in scenes:
        small = dataclasses.replace(s, text=dataclasses.replace(s.text, font_size=9))
        assert read_label(small.image(), small.text.box, 9) != s.text.text
        pixels = np.asarray(s.image(), np.float32)
        x0, y0, x1, y1 = s.text.box
        label = pixels[y0:y1, x0:x1]
        paper = np.median(label, axis=(0, 1))
        pixels[y0:y1, x0:x1] = paper + 0.25 * (label - paper)  # contrast cut to a quarter
        faint = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        assert read_label(faint, s.text.box, s.text.font_size) != s.text.text
