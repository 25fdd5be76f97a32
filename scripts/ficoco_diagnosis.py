"""Why FiCoCo-V falls below `random`, and FiCoCo-L behind FastV, on the embedded benchmark: filter and merge
measured apart.

    python scripts/ficoco_diagnosis.py                 # 150 test questions at 64 tokens, about 8 min on 2 cores
    python scripts/ficoco_diagnosis.py --n 500 --budget 128 --stage llm

1. Filter. At FiCoCo-V's first merge layer (all 577 tokens still there) it records the head-mean logits A and
   scores every patch as the filter does (METHODS.md §3.1): the task term a = A[CLS, i], the redundancy term
   b = mean_j A[i, j], and lam * a_hat - (1 - lam) * b_hat. Against the scene's ground truth (patches that hold
   an object or a label, `lightning_modules.grounding.object_patches`) it prints each score's AUC (the chance
   that an object patch outranks a background one; the filter keeps high scores) and the object share of the
   `budget` best-scored patches.
2. Accuracy. `vtprune validate` of ficoco-v at `budget` with the paper's lam = 0.35 and with lam = 1 (task term
   only), each with the paper's compress and with the sources dropped unmerged (compress replaced by the
   identity, a diagnosis only: not a pruner option), into runs/ficoco_diagnosis/.
3. FiCoCo-L (`--stage llm`): at its first merge layer (decoder layer 1 of the tiny LLaVA, where FastV also cuts)
   the filter's keep score -S, S = beta * sum_{j in V} A[i, j] - (1 - beta) * mean_{t in T} A[i, t] (beta =
   0.6), its two terms, and FastV's score (the last token's attention) on the same states, as AUCs against the
   object patches; then ficoco-l's accuracy with its compress and with the sources dropped unmerged.
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


def validate(name: str, budget: int, n: int, lam: float | None, args: list[str] | None = None) -> dict:
    """One ficoco-v run (or the pruner `args` names) on the first n test questions; its results.json."""
    out = OUT / name
    lam_arg = [] if lam is None else [f"--model.pruner.lam={lam}"]
    vtprune(["validate", "-c", "configs/experiment/demo.yaml", "--model.pruner=ficoco-v", *(args or []),
             f"--model.pruner.budget={budget}", *lam_arg, f"--data.init_args.limit={n}",
             f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false"])  # fmt: skip
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
    objects = scene_objects(n)
    a, b = attn[:, 0, 1:], attn[:, 1:, 1:].mean(-1)
    a_hat, b_hat = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    print(f"# filter at the first merge layer, {n} test scenes; object patches are {objects.float().mean():.1%}")
    print(f"mean a: object {a[objects].mean():+.3f}, background {a[~objects].mean():+.3f}; "
          f"mean b: object {b[objects].mean():+.3f}, background {b[~objects].mean():+.3f}")  # fmt: skip
    print(f"AUC of a (high = kept): {auc(a, objects):.3f}; AUC of -b: {auc(-b, objects):.3f}")
    for lam in (PAPER_LAM, 0.5, 1.0):
        print(ranking(f"lam={lam}", lam * a_hat - (1 - lam) * b_hat, objects, budget))
    return results


def ranking(name: str, score: Tensor, objects: Tensor, budget: int) -> str:
    """One line: the score's AUC and the object share of its `budget` best patches."""
    top = score.topk(budget, -1).indices
    share = objects.gather(1, top).float().mean()
    return f"{name}: AUC {auc(score, objects):.3f}; object share of the best {budget}: {share:.1%}"


def scene_objects(n: int) -> Tensor:
    """(n, 576) bool: the patches of test scenes 0..n-1 that hold an object or a label."""
    return torch.stack([object_patches(patch_targets(make_sample(0, "test", i))) for i in range(n)])


def llm_scores(budget: int, n: int) -> tuple[dict[str, Tensor], dict]:
    """Per visual token (n, 576), at FiCoCo-L's first merge layer: its keep score, the two filter terms and
    FastV's score; and the results of the ficoco-l run they were caught from."""
    caught: list[dict[str, Tensor]] = []
    original = ficoco.llm_step

    def spy(state, r, cfg):
        visual = state.valid & state.visual
        if r > 0 and bool((visual.sum(-1) == 576).all()):  # the first merge layer: every visual token there
            caught.append(filter_terms(state, visual, cfg.beta))
        return original(state, r, cfg)

    with mock.patch.object(ficoco, "llm_step", spy):
        results = validate("llm-merge", budget, n, None, ["--model.pruner=ficoco-l"])
    return {k: torch.cat([c[k] for c in caught]) for k in caught[0]}, results


def filter_terms(state, visual: Tensor, beta: float) -> dict[str, Tensor]:
    """FiCoCo-L's filter terms and FastV's score of each visual token, (B, 576) each, in patch order."""
    redundancy, relevance, _ = ficoco.llm_filter_terms(state, ficoco.all_logits(state))
    fastv = state.attention(state.last_index()[:, None])[:, 0]
    terms = {"keep score -S": -(beta * redundancy - (1 - beta) * relevance), "-redundancy": -redundancy,
             "relevance": relevance, "fastv": fastv}  # fmt: skip
    return {k: v[visual].view(len(v), 576).detach().float() for k, v in terms.items()}


def llm_report(budget: int, n: int) -> None:
    scores, merged = llm_scores(budget, n)
    objects = scene_objects(n)
    print(f"# FiCoCo-L's filter at its first merge layer, {n} test scenes (AUC: object patch above background)")
    for name, score in scores.items():
        print(ranking(name, score, objects, budget))
    with mock.patch.object(ficoco, "compress", lambda state, *_, **__: state):
        dropped = validate("llm-drop", budget, n, None, ["--model.pruner=ficoco-l"])
    print(f"ficoco-l at {budget}: with compress {merged['accuracy']:.3f}, sources dropped unmerged "
          f"{dropped['accuracy']:.3f}")  # fmt: skip


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
    parser.add_argument("--stage", choices=["vision", "llm", "both"], default="both", help="FiCoCo-V, -L or both")
    args = parser.parse_args()
    if args.stage in ("vision", "both"):
        paper = filter_report(args.budget, args.n)
        accuracy_report(args.budget, args.n, paper)
    if args.stage in ("llm", "both"):
        llm_report(args.budget, args.n)


if __name__ == "__main__":
    main()
