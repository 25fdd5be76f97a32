"""Can the tiny LLaVA's decoder learn where things are? The probe behind the README's account of `spatial`.

    python scripts/spatial_probe.py --form relative --steps 1200    # the benchmark's question: stays at chance
    python scripts/spatial_probe.py --form absolute --steps 300     # one object's half of the image: learnt

A fresh decoder learns one question form on stage 2a's exact grounded tokens (`GroundedPretraining`, no
noise), background tokens dropped so a step is cheap. Every --every steps it prints the training loss (the mean
over each answer and its `</s>`, so chance is ln(4) / 2 = 0.69 for four answers) and the accuracy three ways:
val scenes with all 576 tokens, val scenes with the background dropped, train scenes with the background dropped.

Forms (one-word answers among left/right/above/below):
  relative  "where is the A relative to the B ?", answered by `side_of(A, B)` (the benchmark's family)
  absolute  "where is the A ?": the half of the image A lies in, left or right (A within 30 px of the middle: skipped)
  typed     "where is the A relative to the C object ?": B named by its colour, so no word order is needed
            to tell the two objects apart
  first     the relative question answered with A's own side of the image centre (the axis of the larger
            offset), a shortcut that scores 0.56 against the real answers
--mix N adds up to N absolute questions to each training scene's turns.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import torch

from data.shapes import Sample, make_sample
from data.shapes_dialogue import scene_questions
from data.shapes_scene import IMAGE_SIZE, Obj, side_of
from data.shapes_targets import patch_targets
from lightning_modules.grounded_pretraining import GroundedPretraining
from lightning_modules.shapes_data import collate_train

FORMS = ("relative", "absolute", "typed", "first")
MIDDLE = IMAGE_SIZE / 2
MARGIN = 30  # px: an `absolute` object this close to the middle has no clear half


def image_side(obj: Obj) -> str:
    """Where `obj` lies from the image centre, on the axis of its larger offset."""
    dx, dy = obj.center[0] - MIDDLE, obj.center[1] - MIDDLE
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def questions(sample: Sample, form: str) -> list[tuple[str, str]]:
    """Every (question, answer) of `form` the scene allows; named objects are unique in it."""
    shapes, colors = Counter(o.shape for o in sample.objects), Counter(o.color for o in sample.objects)
    if form == "absolute":
        return [(f"where is the {o.shape} ?", "left" if o.center[0] < MIDDLE else "right") for o in sample.objects
                if shapes[o.shape] == 1 and abs(o.center[0] - MIDDLE) > MARGIN]  # fmt: skip
    if form == "typed":
        pairs = [(a, b) for a in sample.objects for b in sample.objects
                 if a is not b and shapes[a.shape] == 1 and colors[b.color] == 1]  # fmt: skip
        sides = [(a, b, side_of(a, b)) for a, b in pairs]
        return [(f"where is the {a.shape} relative to the {b.color} object ?", side) for a, b, side in sides if side]
    relative = scene_questions(sample).get("spatial", [])
    if form == "first":
        named = {o.shape: o for o in sample.objects}
        return [(q, image_side(named[q.split()[3]])) for q, _ in relative]
    return relative


def items(split: str, n: int, form: str, turns: int, mix: int) -> list[dict]:
    """`n` scenes of `split` with a question of `form`, as `collate_train` items (first turn = the scored one)."""
    out, index = [], 0
    while len(out) < n:
        sample = make_sample(0, split, index)
        index += 1
        rng = random.Random(index)
        qas = questions(sample, form)
        rng.shuffle(qas)
        if not qas:
            continue
        extra = questions(sample, "absolute")[:mix] if split == "train" else []
        question, answer = qas[0]
        out.append({"id": sample.id, "question": question, "answer": answer, "task": "spatial",
                    "targets": patch_targets(sample), "turns": qas[:turns] + extra})  # fmt: skip
    return out


@torch.no_grad()
def accuracy(module: GroundedPretraining, data: list[dict], drop: bool) -> float:
    """Greedy accuracy of each item's first question; `drop`: without the background tokens."""
    module.llava.eval()
    right = 0
    for start in range(0, len(data), 50):
        batch = collate_train(data[start : start + 50])
        turns = [[qa] for qa in zip(batch["question"], batch["answer"])]
        best = module.logits(*module.sequences(batch, turns, drop=drop))[::2].argmax(-1)  # answer rows, not </s>
        answers = module.processor.tokenizer.batch_decode(best[:, None], skip_special_tokens=True)
        right += sum(a.strip() == gold for a, gold in zip(answers, batch["answer"]))
    module.llava.train()
    return right / len(data)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    module = GroundedPretraining(None, noise=0.0, background=0.0, seed=args.seed)  # background 0: all dropped
    start = time.time()
    pool = items("train", args.scenes, args.form, args.turns, args.mix)
    val = items("val", args.val, args.form, 1, 0)
    params = [p for p in module.llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    for step in range(args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 warmup steps, then constant
        loss, _ = module.loss(collate_train(random.sample(pool, args.batch_size)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.every == 0:
            scores = [accuracy(module, val, False), accuracy(module, val, True)]
            scores.append(accuracy(module, pool[: args.val], True))
            print(f"step {step:5d}  loss {loss.item():.3f}  val {scores[0]:.3f}  val-no-bg {scores[1]:.3f}  "
                  f"train-no-bg {scores[2]:.3f}  {time.time() - start:.0f}s", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--form", choices=FORMS, default="relative")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mix", type=int, default=0, help="absolute questions added to each training scene")
    parser.add_argument("--turns", type=int, default=4, help="questions of --form per training scene")
    parser.add_argument("--scenes", type=int, default=8000, help="training scenes (drawn once)")
    parser.add_argument("--val", type=int, default=200, help="scenes scored each time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
