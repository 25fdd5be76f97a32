"""Why FiCoCo-V falls below `random` on the embedded benchmark: its filter and its merge, measured apart.

    python scripts/ficoco_diagnosis.py                 # 150 test questions at 64 tokens, about 5 min on 2 cores
    python scripts/ficoco_diagnosis.py --n 500 --budget 128

1. Filter. At FiCoCo-V's first merge layer (all 577 tokens still there) it records the head-mean logits A and
   scores every patch as the filter does (METHODS.md §3.1): the task term a = A[CLS, i], the redundancy term
   b = mean_j A[i, j], and lam * a_hat - (1 - lam) * b_hat. Against the scene's ground truth (patches that hold
   an object or a label, `lightning_modules.grounding.object_patches`) it prints each score's AUC (the chance
   that an object patch outranks a background one; the filter keeps high scores) and the object share of the
   `budget` best-scored patches.
2. Accuracy. `vtprune validate` of ficoco-v at `budget` with the paper's lam = 0.35 and with lam = 1 (task term
   only), each with the paper's compress and with the sources dropped unmerged (compress replaced by the
   identity, a diagnosis only: not a pruner option), into runs/ficoco_diagnosis/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

import pruners.methods.ficoco as ficoco
from data.shapes import make_sample
from data.shapes_targets import patch_targets
from lightning_modules.cli import main as vtprune
from lightning_modules.grounding import object_patches

OUT = Path("runs/ficoco_diagnosis")
PAPER_LAM = 0.35


def validate(name: str, budget: int, n: int, lam: float, args: list[str] | None = None) -> dict:
    """One ficoco-v run on the first n test questions; its results.json."""
    out = OUT / name
    vtprune(["validate", "-c", "configs/experiment/demo.yaml", "--model.pruner=ficoco-v",
             f"--model.pruner.budget={budget}", f"--model.pruner.lam={lam}", f"--data.init_args.limit={n}",
             f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", *(args or [])])  # fmt: skip
    return json.loads(next(out.rglob("results.json")).read_text())


def first_layer_logits(budget: int, n: int) -> tuple[Tensor, dict]:
    """(n, 577, 577) head-mean logits at the first merge layer, caught from the paper-setting run, and that
    run's results."""
    caught: list[Tensor] = []
    original = ficoco.all_logits

    def spy(state):
        attn = original(state)
        if attn.shape[-1] == 577:  # the first merge layer: nothing removed yet
            caught.append(attn.detach().float())
        return attn

    with mock.patch.object(ficoco, "all_logits", spy):
        results = validate(f"merge-lam{PAPER_LAM}", budget, n, PAPER_LAM)
    return torch.cat(caught), results


def auc(scores: Tensor, objects: Tensor) -> float:
    """Mean over images of P(an object patch scores above a background patch)."""
    per_image = [(s[o][:, None] > s[~o][None]).float().mean() for s, o in zip(scores, objects) if o.any()]
    return torch.stack(per_image).mean().item()


def filter_report(budget: int, n: int) -> dict:
    """Prints the filter's statistics; returns the paper-setting run's results."""
    attn, results = first_layer_logits(budget, n)
    objects = torch.stack([object_patches(patch_targets(make_sample(0, "test", i))) for i in range(n)])
    a, b = attn[:, 0, 1:], attn[:, 1:, 1:].mean(-1)
    a_hat, b_hat = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    print(f"# filter at the first merge layer, {n} test scenes; object patches are {objects.float().mean():.1%}")
    print(f"mean a: object {a[objects].mean():+.3f}, background {a[~objects].mean():+.3f}; "
          f"mean b: object {b[objects].mean():+.3f}, background {b[~objects].mean():+.3f}")  # fmt: skip
    print(f"AUC of a (high = kept): {auc(a, objects):.3f}; AUC of -b: {auc(-b, objects):.3f}")
    for lam in (PAPER_LAM, 0.5, 1.0):
        score = lam * a_hat - (1 - lam) * b_hat
        top = score.topk(budget, -1).indices
        print(f"lam={lam}: AUC {auc(score, objects):.3f}; object share of the best {budget}: "
              f"{objects.gather(1, top).float().mean():.1%}")  # fmt: skip
    return results


def accuracy_report(budget: int, n: int, paper: dict) -> None:
    print(f"# accuracy at {budget} tokens, {n} test questions")
    for lam in (PAPER_LAM, 1.0):
        merged = paper if lam == PAPER_LAM else validate(f"merge-lam{lam}", budget, n, lam)
        with mock.patch.object(ficoco, "compress", lambda state, *_, **__: state):
            dropped = validate(f"drop-lam{lam}", budget, n, lam)
        print(f"lam={lam}: with compress {merged['accuracy']:.3f}, sources dropped unmerged {dropped['accuracy']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=150, help="test questions (default 150)")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens kept (default 64)")
    args = parser.parse_args()
    paper = filter_report(args.budget, args.n)
    accuracy_report(args.budget, args.n, paper)


if __name__ == "__main__":
    main()
