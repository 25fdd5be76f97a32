"""FitPrune's offline recipe search (Ye et al., AAAI 2025, arXiv 2409.10197; METHODS.md §6 steps 1-3).

    python scripts/fitprune_recipe.py --model checkpoints/tiny-llava-shapes --rho 0.6 \
        --out configs/pruner/fitprune-tiny-60.yaml
    vtprune validate -c configs/experiment/demo.yaml -c configs/pruner/fitprune-tiny-60.yaml

Calibration data: the embedded benchmark's val split (`data.shapes`, the first --num-samples
questions; default 66, the official 0.01 % of LLaVA's mix665k), or a `questions.jsonl` folder (--data).

  1. Full model, every sample, every LLM layer l (head-max attention, the runtime's probe, SDPA kept):
     cross mass = sum over text queries and visual keys of A / |T|; self mass = sum over visual queries
     and visual keys of A / |V| (`record`).
  2. For a given alpha, run the model layer by layer and at each layer l (`SearchPruner`): per visual
     token the cross score sum_t A[t, j] / |T| and the self score sum_v A[v, j] / |V|; for each score
     take the longest prefix of the ascending order whose removal leaves at least full - alpha * full
     of the mass (`prefix_mask`); delete the intersection of the two prefixes inside layer l (after
     its attention, as at inference).
  3. Predicted FLOPs: per layer, the attention part (q, k, v projections, scores and mixing) on the
     tokens present and the o projection and MLP on the tokens kept (`layer_parts`, the pruners.flops
     formula split at the cut). Pruning stops at the first layer where the samples' mean prediction
     with no further deletion fits (1 - rho) of the unpruned cost (`stop_layer`). Binary search of
     alpha in [0, 1] to tolerance 0.01 (`bisect_alpha`) for the smallest alpha that fits.
  The recipe is each layer's deletions summed over the samples, integer-divided by their number.

Deviations from the official `statistical_analysis.py`:
  * The official loop returns the scheme of the LAST alpha it tried, which may miss the target; here
    the recipe is the one at the smallest alpha found that meets it (the bracket's upper end).
  * A prefix may cover every visual token (official: at most all but two, and a stale count from the
    previous sample when no prefix breaks the bound, e.g. at alpha = 1).
  * The runtime cannot cut after the last layer, so the search prunes layers 0..L-2 (official 0..31).
  * FLOPs: the per-layer formula of pruners.flops (= the official 4nd^2 + 2n^2d + 3ndm without
    grouped-query attention, exact with it). n counts the visual tokens only, as official
    (--flops-tokens visual); --flops-tokens all counts the whole sequence, as vtprune's report does.
  * Batched forwards (batched equals one-by-one in the runtime) in the model's dtype (official fp16,
    batch 1, fixed 35-token system prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from lightning_modules.hf_model import chat_prompt, load_model_and_processor
from pruners import attach
from pruners.base import ModelInfo, Pruner, Stage, TokenState
from pruners.flops import DecoderShape, llama_layer_macs
from pruners.methods.fitprune import attention_scores
from pruners.ops import compact_index

OFFICIAL_SAMPLES = 66  # 0.01 % of LLaVA-1.5's 665k instruction samples
TOLERANCE = 0.01


# ------------------------------------------------------------------ step 2: one layer of the search
def prefix_mask(scores: Tensor, candidates: Tensor, target: Tensor) -> Tensor:
    """(B, N) bool: the longest prefix of the candidates in ascending score order whose removal keeps the
    candidates' summed score >= target (B,). Ties go to the earlier slot."""
    values = scores.double().masked_fill(~candidates, float("inf"))
    ordered, order = values.sort(dim=-1, stable=True)
    ordered = ordered.masked_fill(~candidates.gather(1, order), 0.0)  # non-candidates sort last, weigh 0
    # Mass left after removing the first i tokens, i = 0..N, as suffix sums: exactly 0 when all are gone.
    left = torch.cat([ordered.flip(-1).cumsum(-1).flip(-1), ordered.new_zeros(len(ordered), 1)], -1)
    fits = left >= target.double()[:, None]
    length = (fits.long().cumprod(-1).sum(-1) - 1).clamp(min=0)  # longest i with every prefix <= i fitting
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return candidates & (rank < length[:, None])


class SearchPruner(Pruner):
    """Hooks every LLM layer 0..L-2 inside the layer (after attention), as FitPrune cuts.

    `alpha=None` records the full model's masses (`masses[l]` = (cross, self), each (B,)). Otherwise
    deletes the intersection of the two prefixes against `full` = (cross (B, L-1), self (B, L-1)) of
    the batch, and records `visual[l]` (visual tokens present) and `deleted[l]` per sample.
    """

    name = "fitprune-search"
    stages = frozenset({Stage.LLM_LAYER})
    llm_hook_point = "attn"

    def __init__(self, alpha: float | None = None) -> None:
        super().__init__(None)
        self.alpha = alpha
        self.full: tuple[Tensor, Tensor] | None = None
        self.masses: dict[int, tuple[Tensor, Tensor]] = {}
        self.visual: dict[int, Tensor] = {}
        self.deleted: dict[int, Tensor] = {}
        self.other: Tensor | None = None

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.llm_layers < 2:
            raise ValueError(f"fitprune: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        self.llm_layers = tuple(range(info.llm_layers - 1))

    def llm_layer(self, state: TokenState) -> TokenState:
        layer = state.layer
        candidates = state.visual & state.valid
        if layer == 0:
            self.other = (state.valid & ~state.visual).sum(-1)  # non-visual tokens (constant)
        cross, self_score, text = attention_scores(state)
        cross = cross / text.clamp(min=1)[:, None]
        self.visual[layer] = candidates.sum(-1)
        if self.alpha is None:
            self.masses[layer] = ((cross * candidates).sum(-1), (self_score * candidates).sum(-1))
            return state
        full_cross, full_self = (m[:, layer].to(cross.device) for m in self.full)
        drop = prefix_mask(cross, candidates, full_cross - self.alpha * full_cross)
        drop &= prefix_mask(self_score, candidates, full_self - self.alpha * full_self)
        self.deleted[layer] = drop.sum(-1)
        return state.keep(compact_index(state.valid & ~drop)) if drop.any() else state


# ------------------------------------------------------------------ step 3: FLOPs, stop layer, alpha
def layer_parts(n: Tensor, shape: DecoderShape) -> tuple[Tensor, Tensor]:
    """Multiply-adds of a decoder layer on n tokens, split at FitPrune's cut: (q, k, v projections with
    scores and mixing; o projection and MLP). They add up to `pruners.flops.llama_layer_macs`."""
    n = n.double()
    d, a, c, m = shape.hidden, shape.attn, shape.kv, shape.mlp
    return n * d * a + 2 * n * d * c + 2 * n * n * a, n * d * a + 3 * n * d * m


def predicted_cost(visual: Tensor, deleted: Tensor, other: Tensor, shape: DecoderShape) -> Tensor:
    """(S, L) predicted prefill multiply-adds per sample if pruning stops before layer s = 0..L-1.

    visual, deleted: (S, L-1) visual tokens present at / deleted inside layers 0..L-2 when every hook
    prunes; other: (S,) tokens counted besides them (0: the official visual-only count). Stopping at
    s keeps layers < s as searched and runs layers s..L-1 on the tokens present at s.
    """
    kept = visual - deleted
    present = torch.cat([visual, kept[:, -1:]], 1) + other[:, None]  # (S, L) tokens entering each layer
    attn_part, _ = layer_parts(present[:, :-1], shape)
    _, post_part = layer_parts(kept + other[:, None], shape)
    done = torch.cat([present.new_zeros(len(present), 1).double(), (attn_part + post_part).cumsum(-1)], 1)
    layers = present.shape[1]
    rest = (layers - torch.arange(layers, device=present.device)) * sum(layer_parts(present, shape))
    return done + rest


def stop_layer(cost: Tensor, origin: Tensor, rho: float) -> int | None:
    """First s whose mean predicted cost fits (1 - rho) of the mean unpruned cost; None if none does."""
    fits = cost.mean(0) <= (1 - rho) * origin.mean()
    return int(fits.nonzero()[0]) if fits.any() else None


def recipe_until(deleted: Tensor, stop: int) -> list[int]:
    """Per-layer deletions of layers < stop summed over the samples, integer-divided by their number;
    0 from `stop` on and at the last layer."""
    counts = deleted.sum(0) // len(deleted)
    return [int(k) if layer < stop else 0 for layer, k in enumerate(counts.tolist())] + [0]


def bisect_alpha(reaches: Callable[[float], bool], tol: float = TOLERANCE) -> float:
    """Official binary search: mid of [lo, hi] until hi - lo <= tol; hi moves down when mid reaches the
    target, lo moves up otherwise. Returns hi, the smallest alpha seen to reach (1.0 must reach)."""
    lo, hi = 0.0, 1.0
    while hi - lo > tol + 1e-6:
        mid = (lo + hi) / 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------ model passes
@dataclasses.dataclass
class Outcome:
    """One alpha's search: trajectories (S, L-1), predicted costs (S, L), stop layer, recipe."""

    alpha: float
    visual: Tensor
    deleted: Tensor
    cost: Tensor
    stop: int | None
    recipe: list[int] | None


def forward(model, pruner: SearchPruner, batch: dict) -> None:
    with torch.no_grad(), attach(model, pruner):
        model(**batch, use_cache=False, logits_to_keep=1)


def record(model, batches: list[dict]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full-model masses (S, L-1) cross and self, visual tokens at the input (S,) and other tokens (S,)."""
    cross, self_, visual, other = [], [], [], []
    for batch in batches:
        pruner = SearchPruner()
        forward(model, pruner, batch)
        layers = sorted(pruner.masses)
        cross.append(torch.stack([pruner.masses[i][0] for i in layers], 1).cpu())
        self_.append(torch.stack([pruner.masses[i][1] for i in layers], 1).cpu())
        visual.append(pruner.visual[0].cpu())
        other.append(pruner.other.cpu())
    return torch.cat(cross), torch.cat(self_), torch.cat(visual), torch.cat(other)


def trajectories(model, batches: list[dict], full: tuple[Tensor, Tensor], alpha: float) -> tuple[Tensor, Tensor]:
    """Visual tokens present at and deleted inside each layer 0..L-2, (S, L-1) each, at `alpha`."""
    visual, deleted, start = [], [], 0
    for batch in batches:
        size = len(batch["input_ids"])
        pruner = SearchPruner(alpha)
        pruner.full = (full[0][start : start + size], full[1][start : start + size])
        forward(model, pruner, batch)
        layers = sorted(pruner.visual)
        visual.append(torch.stack([pruner.visual[i] for i in layers], 1).cpu())
        deleted.append(torch.stack([pruner.deleted[i] for i in layers], 1).cpu())
        start += size
    return torch.cat(visual), torch.cat(deleted)


def search(model, batches: list[dict], rho: float, tol: float = TOLERANCE, flops_tokens: str = "visual"):
    """(Outcome at the chosen alpha, unpruned cost per sample (S,))."""
    shape = DecoderShape.from_config(model.config.text_config)
    cross, self_, visual0, other = record(model, batches)
    other = other if flops_tokens == "all" else torch.zeros_like(other)
    layers = model.config.text_config.num_hidden_layers
    origin = layers * torch.tensor([llama_layer_macs(int(n), shape) for n in visual0 + other], dtype=torch.float64)
    seen: dict[float, Outcome] = {}

    def evaluate(alpha: float) -> Outcome:
        if alpha not in seen:
            visual, deleted = trajectories(model, batches, (cross, self_), alpha)
            cost = predicted_cost(visual, deleted, other, shape)
            stop = stop_layer(cost, origin, rho)
            recipe = None if stop is None else recipe_until(deleted, stop)
            seen[alpha] = Outcome(alpha, visual, deleted, cost, stop, recipe)
        return seen[alpha]

    if evaluate(1.0).stop is None:
        best = math.floor(1e4 * (1 - float(evaluate(1.0).cost.mean(0).min() / origin.mean()))) / 1e4
        raise ValueError(
            f"rho {rho} cannot be reached: alpha = 1 (every visual token deleted in layer 0) predicts a FLOPs "
            f"reduction of {best:.4f} (flops tokens: {flops_tokens}); allowed: rho <= {best:.4f}"
        )
    alpha = bisect_alpha(lambda a: evaluate(a).stop is not None, tol)
    return evaluate(alpha), origin


# ------------------------------------------------------------------ data and output
def calibration_samples(data: str | None, num: int, seed: int) -> list[tuple[Image.Image, str]]:
    """(image, question) pairs: the shapes val split, or the first `num` records of a jsonl folder."""
    if data is None:
        from data.shapes import make_sample

        samples = (make_sample(seed, "val", i) for i in range(num))
        return [(s.image(), s.question) for s in samples]
    from data.jsonl import read_questions

    out = []
    for rec in read_questions(data)[:num]:
        with Image.open(rec.image) as image:
            out.append((image.convert("RGB"), rec.question))
    return out


def make_batches(processor, samples, batch_size: int, prompt: str, dtype, device) -> list[dict]:
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = [chat_prompt(processor, prompt.format(question=q)) for _, q in chunk]
        inputs = processor(images=[im for im, _ in chunk], text=texts, return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        batches.append({k: v.to(device) for k, v in inputs.items()})
    return batches


def write_yaml(path: str | Path, recipe: list[int], comment: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# vtprune validate -c configs/experiment/demo.yaml -c {path}\n"
        f"# FitPrune recipe from scripts/fitprune_recipe.py: {comment}\n"
        "# recipe[l] = visual tokens deleted per image inside LLM layer l (after its attention).\n"
        "model:\n  pruner:\n    class_path: fitprune\n    init_args:\n"
        f"      recipe: [{', '.join(map(str, recipe))}]\n",
        encoding="utf-8",
    )
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fit a FitPrune recipe for a FLOPs-reduction target.")
    parser.add_argument("--model", required=True, help="local Hugging Face LLaVA folder")
    parser.add_argument("--rho", type=float, default=0.6, help="target FLOPs reduction in (0, 1) (official 0.6)")
    parser.add_argument("--data", default=None, help="folder with questions.jsonl (default: shapes val split)")
    parser.add_argument("--num-samples", type=int, default=OFFICIAL_SAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="shapes benchmark seed")
    parser.add_argument("--prompt", default="{question}", help="question template, as PrunedMLLM's")
    parser.add_argument("--tol", type=float, default=TOLERANCE, help="alpha tolerance of the binary search")
    parser.add_argument("--flops-tokens", choices=("visual", "all"), default="visual")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the recipe as a pruner YAML here")
    args = parser.parse_args(argv)
    if not 0 < args.rho < 1:
        parser.error(f"--rho must be in (0, 1), got {args.rho}")
    if not 0 < args.tol < 1:
        parser.error(f"--tol must be in (0, 1), got {args.tol}")
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be at least 1")
    if "{question}" not in args.prompt:
        parser.error(f"--prompt must contain '{{question}}', got {args.prompt!r}")
    return args


def main(argv: list[str] | None = None) -> list[int]:
    args = parse(argv)
    model, processor = load_model_and_processor(args.model, args.dtype)
    model.to(args.device)
    samples = calibration_samples(args.data, args.num_samples, args.seed)
    batches = make_batches(processor, samples, args.batch_size, args.prompt, model.dtype, args.device)
    try:
        outcome, origin = search(model, batches, args.rho, args.tol, args.flops_tokens)
    except ValueError as err:
        raise SystemExit(f"fitprune_recipe: {err}") from err
    reduction = 1 - float(outcome.cost.mean(0)[outcome.stop] / origin.mean())
    comment = (
        f"model {args.model}, rho {args.rho}, alpha {outcome.alpha:.4f}, {len(samples)} calibration samples "
        f"({args.data or f'shapes val, seed {args.seed}'}), predicted FLOPs reduction {reduction:.4f} "
        f"({args.flops_tokens} tokens)"
    )
    print(f"recipe: {outcome.recipe}")
    print(comment)
    if args.out:
        print(f"written: {write_yaml(args.out, outcome.recipe, comment)}")
    return outcome.recipe


if __name__ == "__main__":
    main()
