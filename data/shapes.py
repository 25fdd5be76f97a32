"""The embedded benchmark: procedurally generated visual questions about shapes, with one-word answers.

Sample `index` of split `split` is a pure function of (seed, split, index), so any subset is cheap
and the same seed always gives byte-identical images and identical questions:

    sample = make_sample(seed=0, split="test", index=7)
    sample.question, sample.answer, sample.task   # "what color is the star ?", "red", "color"
    sample.image()                                # 336 x 336 RGB PIL image

    python -m data.shapes --out .cache/shapes --split test --n 3000 --seed 0
        # writes .cache/shapes/test/{questions.jsonl, images/*.png, info.json} (the `data.jsonl` layout)

Six families (FAMILIES), each exactly one sixth of every block of six consecutive indices. Within a
family, answers are dealt from shuffled decks (every len(answers) questions of the family hold each
answer once), then the scene is built to make that answer true. Splits draw from separate streams
(the split name is hashed into every seed), so test never repeats train.

Conventions: questions are lowercase, words separated by spaces, "?" a separate word; answers are one
lowercase word: colour names, shape names, numbers as words ("zero".."five"), yes/no,
left/right/above/below, or the label text lowercased ("k7e"). `vocabulary()` lists every word.

Scenes sit on the patch grid (`data.shapes_scene`): objects fill blocks of 1x1 to 3x3 patches (5x5 when
they carry a label), a label one patch per character.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
from pathlib import Path

from PIL import Image

from data.shapes_questions import ANSWER_KEYS, FAMILIES, PLANNERS, POPE_TYPES, POPULAR, Plan, vocabulary
from data.shapes_scene import CORNERS, FONT_SIZES, TEXTS, Obj, Text, layout, render

__all__ = ["FAMILIES", "POPE_TYPES", "POPULAR", "SPLIT_SIZES", "Sample", "make_sample", "vocabulary", "write_split"]

SPLIT_SIZES = {"train": 60_000, "val": 1_000, "test": 3_000}
# Share of non-read scenes that get a label too: with `read` (1/6), about a third of val and test
# scenes carry text. Train scenes carry one more often (about 60%), so the decoder sees each of the
# twelve codes often enough to learn to read it; the questions keep the same shares in every split.
TEXT_SHARE = {"train": 0.5, "val": 0.2, "test": 0.2}
VERSION = 2  # bump when a change alters what a (seed, split, index) produces; 2: scenes on the patch grid


def _seed(*parts: object) -> int:
    """A 64-bit seed from any parts; sha256, so it does not depend on PYTHONHASHSEED or the platform."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _deal(deck: list, position: int, *parts: object) -> object:
    """Item `position` of an endless sequence of shuffled copies of `deck` (one shuffle per copy)."""
    block, offset = divmod(position, len(deck))
    return random.Random(_seed(*parts, block)).sample(deck, len(deck))[offset]


@dataclasses.dataclass
class Sample:
    """One question about one generated scene."""

    id: str
    task: str
    question: str
    answer: str
    pope: str | None
    objects: list[Obj]
    text: Text | None
    pixel_seed: int

    def image(self) -> Image.Image:
        """The scene, 336 x 336 RGB; identical bytes every call."""
        return render(self.objects, self.text, self.pixel_seed)

    def record(self, image_path: str) -> dict:
        """The `questions.jsonl` line for this sample (plus "pope" for exist questions)."""
        row = {"id": self.id, "image": image_path, "question": self.question, "answer": self.answer, "task": self.task}
        if self.pope is not None:
            row["pope"] = self.pope
        return row


def make_sample(seed: int, split: str, index: int) -> Sample:
    """Sample `index` of `split` ("train", "val" or "test") for `seed`; cheap (no drawing until .image())."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_SIZES)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    family = _deal(FAMILIES, index, seed, split, "family")
    key = _deal(ANSWER_KEYS[family], index // len(FAMILIES), seed, split, "answer", family)
    rng = random.Random(_seed(seed, split, "scene", index))
    plan: Plan = PLANNERS[family](rng, key)
    if plan.text is None and rng.random() < TEXT_SHARE[split]:
        plan.text = _incidental_text(rng, plan.objects)
    if plan.text is not None:
        plan.text.font_size = rng.choice(FONT_SIZES)
        plan.text.dark_on_light = rng.random() < 0.5
    layout(rng, plan.objects, plan.text, plan.relation)
    return Sample(
        id=f"{split}-{index:06d}",
        task=plan.task,
        question=plan.question,
        answer=plan.answer,
        pope=plan.pope,
        objects=plan.objects,
        text=plan.text,
        pixel_seed=_seed(seed, split, "pixels", index),
    )


def _incidental_text(rng: random.Random, objects: list[Obj]) -> Text:
    """A label that no question asks about, so labels do not by themselves signal a `read` question."""
    code = rng.choice(TEXTS)
    if rng.random() < 0.5:
        return Text(code, "corner", rng.choice(CORNERS))
    return Text(code, "object", rng.randrange(len(objects)))


def write_split(out: str | Path, split: str, n: int | None = None, seed: int = 0) -> Path:
    """Write samples 0..n-1 of `split` to `out/split/` as `images/<id>.png` and `questions.jsonl`.

    `n` defaults to SPLIT_SIZES[split]. Also writes `info.json` (generator version, seed, split, n),
    so a cache can tell whether it holds what was asked for. Returns the split folder.

    Each PNG is about 190 kB (per-pixel noise does not compress) and writing runs at about 30 a
    second on one core; for train, prefer drawing samples on the fly with `make_sample(...).image()`.
    """
    n = SPLIT_SIZES[split] if n is None else n
    root = Path(out) / split
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "questions.jsonl").open("w", encoding="utf-8") as lines:
        for index in range(n):
            sample = make_sample(seed, split, index)
            image_path = f"images/{sample.id}.png"
            sample.image().save(root / image_path)
            lines.write(json.dumps(sample.record(image_path)) + "\n")
    info = {"generator": "data.shapes", "version": VERSION, "seed": seed, "split": split, "n": n}
    (root / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a split of the shapes benchmark.")
    parser.add_argument("--out", required=True, help="folder; the split goes to OUT/SPLIT/")
    parser.add_argument("--split", choices=sorted(SPLIT_SIZES), default="test")
    parser.add_argument("--n", type=int, default=None, help="number of questions (default: the split's size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_split(args.out, args.split, args.n, args.seed)
    print(root)


if __name__ == "__main__":
    main()
