"""FiCoCo: Han et al., "Filter, Correlate, Compress: Training-Free Token Reduction for MLLM Acceleration"
(AAAI 2026; arXiv 2411.17686, v1 titled "Rethinking Token Reduction in MLLMs: Towards a Unified Paradigm for
Training-Free Acceleration"; official code `kawhiiiileo/FiCoCo`). Three registry names:
``ficoco-v`` (inside the CLIP encoder), ``ficoco-l`` (inside the LLM decoder, prefill), ``ficoco-vl`` (both).

Every compression step is the paper's filter -> correlate -> compress (METHODS.md §3):

FiCoCo-V (METHODS §3.1), in CLIP layers >= 12 of 24, after the attention residual and before the MLP
(``vision_hook_point = "attn"``), r tokens per layer:
  1. signal: A = head-mean pre-softmax attention logits of that layer over all tokens (the probe, logits=True).
  2. filter: a_i = A[CLS, i], b_i = mean_j A[i, j] over patches j (official row mean; ``redundancy="column"``
     takes mean_j A[j, i], the paper-note's reading); both L2-normalised over the patches;
     score_i = lam * a_hat_i - (1 - lam) * b_hat_i (lam = 0.35), low = redundant.
  3. filter, local penalty: on the patch grid cut into 2x2 windows, the lowest score of each window is pushed
     down: s / 2 if s > 0 else 2 s (scale 2). Sources = the r lowest scores; CLS is never a source.
  4. correlate: for each source row of A (over the allowed targets), k_i = #{j: A[i, j] > quantile_eps(A[i, :])},
     eps = 0.998; one k per layer (and sample) = max_i k_i; targets = top-k of softmax(A[i, :]) over the allowed
     targets; alpha_ij = p_ij / sum_{j in targets(i)} p_ij.
  5. compress (self-preserving): x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij); sources are dropped.

FiCoCo-L (METHODS §3.2), in LLM layers with index > 4 of 32, during prefill, after the attention residual and
before the MLP (``llm_hook_point = "attn"``):
  1. signal: A = head-mean pre-softmax, pre-mask logits of that layer (probe, logits=True). V = the sample's
     visual tokens, T = its text tokens after the first visual token.
  2. filter: S_i = beta * sum_{j in V} A[i, j] - (1 - beta) * mean_{t in T} A[i, t] (beta = 0.6); sources = the
     r highest S.
  3. correlate: C = gamma * A[V, V] + (1 - gamma) * A[V, T] A[T, V] (gamma = 0.6), a token never its own target;
     k and targets from the eps-quantile rule and top-k of softmax(C[i, :]) as in FiCoCo-V.
  4. compress: the paper's self-preserving formula (default) or the official code's additive one
     x_j <- x_j + sum_i alpha_ij x_i (``compress="official"``).
  5. positions are renumbered contiguously after each cut, as the official code does (``renumber_positions``).

Budget (DESIGN.md: visual tokens per image reaching the LLM's last layer). With a budget T the N - T removals are
spread evenly over the merging layers (remainder to the earliest), so exactly T arrive; without one, the code's
constant r per layer is used (V: 42, README; L: 14) while at least one token remains (the official guard), and
`budget` then holds the count that results. FiCoCo-VL gives ``vision_share`` (default 0.5, our choice: the paper
does not say how VL splits a budget) of the removals to the encoder and the rest to the decoder.

Layer schedules are given for CLIP-L (24 layers) and Vicuna-7B (32); other depths map them with
`scale_layers`, then clip them to the hooks the runtime allows: encoder layers below the feature layer (only those
reach the LLM; LLaVA-1.5: 12..22), decoder layers 0..L-2 (a cut inside the last layer changes no output; 32
layers: 5..30). If nothing is left, the last allowed layer is used.

Deviations from the official code, all deliberate (METHODS §3 quirks):
  * Targets are preserved tokens (the paper): a source never links to itself, another source or CLS
    (``targets="kept"``). ``targets="any"`` allows what the official code allows (V: every token, the source
    itself and CLS included; L: every other visual token, sources included); a share landing on a dropped
    token is lost, as there.
  * CLS stays first (the paper). ``cls_order="official"`` replays the official V code's ordering bug: survivors
    are re-sorted by ascending score after each merge, so CLS ends up last, the token at index 0 is read (and
    protected) as "CLS" in the next layer, the true CLS is scored as a patch, and LLaVA's feature selection
    drops index 0 (a patch) while the true CLS reaches the LLM in that patch's image slot. The LLM still sees
    tokens in patch order (the runtime places image tokens by patch), not the official score order.
  * Not replicated (no meaning to keep): the official V code's never-reset 576-slot score buffer for the window
    penalty (windows here are the patch grid's, per image); its "subtract r" remapping of target indices;
    FiCoCo-L's [0, 576) visual window (here: the sample's actual visual tokens). With ``targets="kept"`` the quantile
    runs over a row's allowed targets (official: the whole row, as with ``"any"``); k is at least 1 (the
    official code drops the sources unmerged when ties give k = 0). Not bit-exact with the official code.
  * Token sizes are not used in the merge (paper formula, and the official code resets them every layer); they
    are tracked for reporting only.
  * FiCoCo-L merges up to layer L-2, not L-1: the official 27th merge sits inside the last layer and changes no
    output, so r = 14 leaves 212 tokens at the last layer here (198 after it in the code).
  * None in positions: as the official LLaVA, the LLM sees contiguous positions (``renumber_positions``: the
    runtime renumbers FiCoCo-V's shorter sequence at the LLM input and FiCoCo-L's after every cut).
  * A sample with several images merges budget-per-image times its image count jointly over all its visual
    tokens; a text-only sample is left alone.

Variants: which runs where. FiCoCo-V and -VL need a CLS token for the filter's task term; on an encoder without
CLS whose family still offers hooks inside the encoder (`fallback_needs`), their CLS-free variant runs, chosen
in `setup` from `ModelInfo.provides`: the paper-note's rule for no-CLS encoders (METHODS.md §3.2, "use the mean
of the keys in place of the CLS attention"; the paper text was not readable here), read as the mean of the
patch keys standing in for the CLS query, a_i = head-mean of kbar_h . k_h,i (the logit scale cancels in the
L2 normalisation). Everything else is unchanged; `cls_order="official"` needs a CLS and is rejected there.
No registered family has encoder hooks without CLS today (Qwen2-VL offers no encoder hooks), so the variant is
checked on constructed states. FiCoCo-L never reads CLS and runs wherever LLM hooks exist.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index, merge_weighted
from ..registry import register

PAPER_VISION_DEPTH = 24  # CLIP ViT-L/14-336
PAPER_LLM_DEPTH = 32  # Vicuna-7B
DEFAULT_R_VISION = 42  # README
DEFAULT_R_LLM = 14  # llava_llama.py
TARGETS = ("kept", "any")
CLS_ORDERS = ("paper", "official")
REDUNDANCIES = ("row", "column")
COMPRESSES = ("paper", "official")


# ---------------------------------------------------------------- shared steps


def l2_normalise(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, N) divided by its L2 norm over the slots in `mask`; 0 elsewhere."""
    x = x.masked_fill(~mask, 0.0)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def choose(scores: Tensor, candidates: Tensor, count: Tensor, lowest: bool) -> Tensor:
    """(B, N) bool: the `count` (B,) candidates with the lowest (or highest) scores; ties go to the earlier slot."""
    key = (scores if lowest else -scores).masked_fill(~candidates, float("inf"))
    order = key.sort(dim=-1, stable=True).indices
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return candidates & (rank < count[:, None])


def local_penalty(
    scores: Tensor, candidates: Tensor, patch: Tensor, grid: tuple[int, int], window: int, scale: float
) -> Tensor:
    """Push the lowest candidate score of every `window` x `window` patch window further down (paper's local
    penalty): s / scale if s > 0 else s * scale. `patch` (B, N) is each token's patch index on `grid`; windows at
    the grid's edge may be partial. Of tied minima only the earliest slot is penalised."""
    bsz, n = scores.shape
    rows, cols = grid
    per_row = -(-cols // window)
    buckets = -(-rows // window) * per_row
    win = (patch.clamp(min=0) // cols // window) * per_row + (patch.clamp(min=0) % cols) // window
    win = torch.where(candidates, win, buckets)  # non-candidates share a spare bucket, ignored
    masked = scores.masked_fill(~candidates, float("inf"))
    low = masked.new_full((bsz, buckets + 1), float("inf")).scatter_reduce(1, win, masked, "amin")
    is_min = candidates & (masked == low.gather(1, win))
    slots = torch.arange(n, device=scores.device).expand(bsz, n)
    first = torch.full_like(low, n, dtype=torch.long).scatter_reduce(1, win, slots.masked_fill(~is_min, n), "amin")
    hit = is_min & (slots == first.gather(1, win))
    return torch.where(hit, torch.where(scores > 0, scores / scale, scores * scale), scores)


def correlate(rows: Tensor, allowed: Tensor, active: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Targets and weights of each source (paper's correlate step).

    Args:
        rows: (B, R, N) correlation of each source with every slot.
        allowed: (B, R, N) bool, slots that may be the source's targets.
        active: (B, R) bool, real sources (False for padding rows).
        epsilon: quantile; k_i counts the allowed entries above the row's epsilon-quantile, and every source of
            a sample gets k = max_i k_i (at least 1).

    Returns:
        (B, R, K) target slots and (B, R, K) weights alpha (softmax over the source's k top entries, which is
        softmax over all allowed entries renormalised on the top k); unused entries have weight 0.
    """
    rows = rows.float()
    vals = rows.masked_fill(~allowed, float("nan"))
    threshold = torch.nanquantile(vals, epsilon, dim=-1, keepdim=True)
    k = (vals > threshold).sum(-1).masked_fill(~active, 0).amax(-1).clamp_min(1)  # (B,)
    # Above the quantile lie at most M - 1 - floor(eps (M - 1)) of M entries (2 of 576 at eps = 0.998): a width
    # known from shapes (one more for rounding) spares a device sync; entries past a sample's k get weight 0.
    n = rows.shape[-1]
    width = min(n, n - math.floor(epsilon * (n - 1)))
    top, index = rows.masked_fill(~allowed, float("-inf")).topk(width, dim=-1)
    use = (torch.arange(width, device=rows.device) < k[:, None, None]) & top.isfinite() & active[..., None]
    alpha = torch.where(use, top, float("-inf")).softmax(-1)
    return index, torch.where(use, alpha, 0.0)  # rows without any target give NaN above: weight 0


def compress(state: TokenState, src: Tensor, index: Tensor, alpha: Tensor, additive: bool) -> TokenState:
    """Fold every source `src` (B, R) into its targets `index` (B, R, K) with weights `alpha` (the caller drops
    the sources).

    Self-preserving (paper): x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij), i.e. `merge_weighted`
    with unit sizes. Additive (official FiCoCo-L): x_j <- x_j + sum_i alpha_ij x_i.
    """
    bsz, n, width = state.hidden.shape
    flat_src = src.clamp(min=0)[..., None].expand_as(index).reshape(bsz, -1)
    flat_dst, weights = index.reshape(bsz, -1), alpha.reshape(bsz, -1)
    if additive:
        x = state.hidden.float()
        src_x = torch.gather(x, 1, flat_src[..., None].expand(-1, -1, width))
        hidden = x.scatter_add(1, flat_dst[..., None].expand(-1, -1, width), src_x * weights[..., None])
        hidden = hidden.to(state.hidden.dtype)
    else:
        hidden, _ = merge_weighted(state.hidden, torch.ones_like(state.sizes), flat_src, flat_dst, weights)
    sizes = state.sizes.float()  # bookkeeping only: how many originals each token stands for
    sizes = sizes.scatter_add(1, flat_dst, weights * sizes.gather(1, flat_src)).to(state.sizes.dtype)
    return state.replace(hidden=hidden, sizes=sizes)


def all_logits(state: TokenState) -> Tensor:
    """(B, N, N) head-mean pre-softmax attention logits of the layer, every slot as a query."""
    rows = torch.arange(state.num_tokens, device=state.hidden.device).expand(state.batch_size, -1)
    return state.attention(rows, logits=True)


def not_protected(state: TokenState) -> Tensor:
    return state.valid if state.protected is None else state.valid & ~state.protected


# ---------------------------------------------------------------- the two steps


def cls_logits(attn: Tensor, state: TokenState) -> Tensor:
    """(B, N) the CLS row of the head-mean logits (paper; with `cls_order="official"`, the index-0 token's)."""
    anchor = (state.valid & ~state.visual).float().argmax(-1)
    return attn.gather(1, anchor[:, None, None].expand(-1, 1, attn.shape[-1]))[:, 0]


def mean_key_logits(keys: Tensor, patches: Tensor) -> Tensor:
    """(B, N) the CLS-free task term: head mean of kbar . k_i, kbar = each head's mean key over the patches
    (unscaled: the scale cancels in the L2 normalisation over the patches)."""
    weight = patches.float() / patches.sum(-1, keepdim=True).clamp_min(1)
    mean_key = (keys.float() * weight[:, None, :, None]).sum(2, keepdim=True)  # (B, H, 1, hd)
    return (mean_key @ keys.float().transpose(-1, -2)).mean(1)[:, 0]


def vision_step(state: TokenState, r: int, cfg: _FiCoCo) -> TokenState:
    """One FiCoCo-V step at a CLIP layer (after its attention residual): remove r patch tokens per image."""
    bsz, n = state.valid.shape
    if cfg.cls_order == "official":  # the true patch index; `_official_order` lends it out between layers
        state = state.replace(positions=(state.origin - 1).masked_fill(~state.valid, -1))
    attn = all_logits(state)
    patches = state.valid & state.visual
    # filter: CLS attention (task term) minus redundancy among patches
    a = mean_key_logits(state.extras["keys"], patches) if cfg.cls_free else cls_logits(attn, state)
    weight = patches.float() / patches.sum(-1, keepdim=True).clamp_min(1)  # mean over patches as a matmul
    b = attn @ weight[..., None] if cfg.redundancy == "row" else weight[:, None, :] @ attn
    b = b.reshape(bsz, n)
    score = cfg.lam * l2_normalise(a, patches) - (1 - cfg.lam) * l2_normalise(b, patches)
    candidates = patches & not_protected(state)
    windowed = candidates & (state.positions >= 0)
    score = local_penalty(score, windowed, state.positions, state.grid, cfg.window, cfg.penalty_scale)
    source = choose(score, candidates, torch.full((bsz,), r, device=score.device), lowest=True)
    src = compact_index(source)
    # correlate: the sources' own logit rows
    rows = attn.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, n))
    allowed = (patches & ~source) if cfg.targets == "kept" else state.valid
    index, alpha = correlate(rows, allowed[:, None, :].expand_as(rows), src >= 0, cfg.epsilon)
    merged, keep = compress(state, src, index, alpha, additive=False), state.valid & ~source
    if cfg.cls_order == "official":
        return _official_order(merged, keep, score)
    return merged.keep(compact_index(keep))


def _official_order(state: TokenState, keep: Tensor, score: Tensor) -> TokenState:
    """Survivors in the official V code's order: patches by ascending score, then the index-0 token. The new
    index-0 token is the next layer's "CLS" (non-visual, so LLaVA's feature selection drops it); the true CLS,
    if it survives, takes that token's patch index, i.e. its image slot in the LLM."""
    n = keep.shape[1]
    key = score.masked_fill(~state.visual, float("inf")).masked_fill(~keep, float("-inf"))
    order = key.sort(dim=-1, stable=True).indices
    width = int(keep.sum(-1).max())
    order = order[:, n - width :]
    new = state.keep(torch.where(keep.gather(1, order), order, -1))
    anchor = new.valid & (new.valid.long().cumsum(-1) == 1)
    patch = (new.origin - 1).masked_fill(~new.valid, -1)
    lent = torch.where(anchor, patch, 0).sum(-1, keepdim=True)
    positions = torch.where(new.valid & (new.origin == 0), lent, patch).masked_fill(anchor, -1)
    return new.replace(visual=new.valid & ~anchor, positions=positions)


def llm_filter_terms(state: TokenState, attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FiCoCo-L's filter terms of every token from its logits `attn` (B, N, N): (redundancy: the sum of its
    logits to the visual tokens, relevance: the mean of its logits to the text after the image, that text
    mask). Sums as matmuls: the logits are finite, so masked entries add exact zeros."""
    n = state.valid.shape[1]
    visual = state.valid & state.visual
    slots = torch.arange(n, device=visual.device)
    first_visual = torch.where(visual, slots, n).amin(-1, keepdim=True)
    text = state.valid & ~state.visual & (slots > first_visual)
    text_mean = text.float() / text.sum(-1, keepdim=True).clamp_min(1)
    return (attn @ visual.float()[..., None])[..., 0], (attn @ text_mean[..., None])[..., 0], text


def llm_step(state: TokenState, r: int, cfg: _FiCoCo) -> TokenState:
    """One FiCoCo-L step at a decoder layer (after its attention residual): remove r visual tokens per image."""
    bsz, n = state.valid.shape
    images = state.num_images
    if images is None:  # no count given: one image per sample
        images = torch.ones(bsz, dtype=torch.long, device=state.hidden.device)
    visual = state.valid & state.visual
    candidates = visual & not_protected(state)
    count = torch.minimum(r * images.to(visual.device), candidates.sum(-1))
    if r == 0 or not bool(count.any()):
        return state.keep(compact_index(state.valid))  # a new state, so the runtime still renumbers
    attn = all_logits(state)
    slots = torch.arange(n, device=visual.device)
    redundancy, relevance, text = llm_filter_terms(state, attn)  # filter, step 2: the r highest S are sources
    source = choose(cfg.beta * redundancy - (1 - cfg.beta) * relevance, candidates, count, lowest=False)
    src = compact_index(source)
    # correlate: direct visual-visual logits plus the indirect path through the text
    rows = attn.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, n))
    indirect = (rows * text[:, None, :]) @ attn  # sum over text t of A[i, t] A[t, j]
    corr = cfg.gamma * rows + (1 - cfg.gamma) * indirect
    if cfg.targets == "kept":
        allowed = (visual & ~source)[:, None, :].expand_as(rows)
    else:
        allowed = visual[:, None, :] & (slots[None, None, :] != src[..., None])
    index, alpha = correlate(corr, allowed, src >= 0, cfg.epsilon)
    merged = compress(state, src, index, alpha, additive=cfg.compress == "official")
    return merged.keep(compact_index(state.valid & ~source))


# ---------------------------------------------------------------- schedules


def spread(total: int, layers: tuple[int, ...]) -> dict[int, int]:
    """`total` removals over `layers` as evenly as possible, the remainder to the earliest layers."""
    share, extra = divmod(total, len(layers))
    return {layer: share + (i < extra) for i, layer in enumerate(layers)}


def constant(n: int, r: int, layers: tuple[int, ...]) -> dict[int, int]:
    """r removals per layer from n tokens while more than r remain (the official code's guard)."""
    out = {}
    for layer in layers:
        out[layer] = r if n - r > 0 else 0
        n -= out[layer]
    return out


def vision_merge_layers(info: ModelInfo, start: int) -> tuple[int, ...]:
    """CLIP layers start..23 (of 24) on this tower, restricted to those below the feature layer."""
    scaled = scale_layers(tuple(range(start, PAPER_VISION_DEPTH)), PAPER_VISION_DEPTH, info.vision_layers)
    layers = tuple(layer for layer in scaled if layer < info.vision_feature_layer)
    return layers or ((info.vision_feature_layer - 1,) if info.vision_feature_layer > 0 else ())


def llm_merge_layers(info: ModelInfo, start: int) -> tuple[int, ...]:
    """Decoder layers start..31 (of 32) on this decoder, restricted to the hooks allowed (0..L-2)."""
    scaled = scale_layers(tuple(range(start, PAPER_LLM_DEPTH)), PAPER_LLM_DEPTH, info.llm_layers)
    layers = tuple(layer for layer in scaled if layer <= info.llm_layers - 2)
    return layers or ((info.llm_layers - 2,) if info.llm_layers >= 2 else ())


# ---------------------------------------------------------------- argument checks


def _fraction(name: str, what: str, value, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name}: {what} must be a number in {span}, got {value!r}")
    return float(value)


def _choice(name: str, what: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: {what} must be one of {allowed}, got {value!r}")
    return value


def _int(name: str, what: str, value, low: int, high: int | None = None, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {what} must be an int {span}{' or None' if none_ok else ''}, got {value!r}")
    return value


# ---------------------------------------------------------------- pruners


class _FiCoCo(Pruner):
    """What the three variants share: hyperparameters, schedules and the two stage hooks."""

    def _constant_r(self, budget: int | None, r: int | None) -> int | None:
        """The code's constant-r mode (tokens merged per layer), exclusive with a budget."""
        if budget is not None and r is not None:
            raise ValueError(f"{self.name}: give budget ({budget}) or r ({r}), not both")
        return _int(self.name, "r (tokens merged per layer)", r, 1, none_ok=True)

    def _vision_args(self, start: int, lam, epsilon, window, penalty_scale, redundancy, targets, cls_order) -> None:
        name = self.name
        self.vision_start = _int(name, "vision start layer (of CLIP's 24)", start, 0, PAPER_VISION_DEPTH - 1)
        self.lam = _fraction(name, "lam (filter weight of the CLS term)", lam)
        self.epsilon = _fraction(name, "epsilon (correlate quantile)", epsilon, low_open=True, high_open=True)
        self.window = _int(name, "window (local penalty window side)", window, 1)
        if isinstance(penalty_scale, bool) or not isinstance(penalty_scale, (int, float)) or penalty_scale < 1:
            raise ValueError(f"{name}: penalty_scale must be a number >= 1 (1 = no penalty), got {penalty_scale!r}")
        self.penalty_scale = float(penalty_scale)
        self.redundancy = _choice(name, "redundancy", redundancy, REDUNDANCIES)
        self.targets = _choice(name, "targets", targets, TARGETS)
        self.cls_order = _choice(name, "cls_order", cls_order, CLS_ORDERS)
        self.cls_free = False  # set in setup: the mean-key filter for encoders without CLS
        self.vision_hook_point = "attn"
        self.vision_schedule: dict[int, int] = {}

    def _llm_args(self, start: int, beta, gamma, epsilon, targets, compress_mode) -> None:
        name = self.name
        self.llm_start = _int(name, "llm start layer (of Vicuna's 32)", start, 0, PAPER_LLM_DEPTH - 1)
        self.beta = _fraction(name, "beta (filter weight of the visual term)", beta)
        self.gamma = _fraction(name, "gamma (correlate weight of the direct term)", gamma)
        self.epsilon = _fraction(name, "epsilon (correlate quantile)", epsilon, low_open=True, high_open=True)
        self.targets = _choice(name, "targets", targets, TARGETS)
        self.compress = _choice(name, "compress", compress_mode, COMPRESSES)
        self.llm_schedule: dict[int, int] = {}

    def _setup_vision(self, info: ModelInfo, remove: int | None, r: int | None) -> int:
        """Fix the encoder schedule; returns the tokens it removes per image."""
        self.cls_free = type(self).uses_fallback(info.provides)
        if self.cls_free and self.cls_order == "official":
            raise ValueError(f"{self.name}: cls_order='official' replays a CLS ordering bug, but this encoder has "
                             "no CLS token; allowed: cls_order='paper'")
        if not info.has_cls and not self.cls_free:
            raise ValueError(
                f"{self.name}: the vision filter reads CLS attention; this encoder has no CLS token "
                "(allowed: encoders with a CLS token)"
            )
        layers = vision_merge_layers(info, self.vision_start)
        if not layers:
            raise ValueError(
                f"{self.name}: no vision layer below the feature layer {info.vision_feature_layer} "
                "to merge in (allowed: vision_feature_layer >= 1)"
            )
        patches = info.grid[0] * info.grid[1]
        if remove is None:
            schedule = constant(patches, r or DEFAULT_R_VISION, layers)
        elif remove > patches - 1:
            low = info.visual_tokens - patches + 1
            raise ValueError(
                f"{self.name}: budget {info.visual_tokens - remove} keeps no patch token (CLS is never "
                f"merged): allowed {low}..{info.visual_tokens}"
            )
        else:
            schedule = spread(remove, layers)
        self.vision_schedule = {layer: r for layer, r in schedule.items() if r > 0}
        self.vision_layers = tuple(self.vision_schedule)
        return sum(self.vision_schedule.values())

    def _setup_llm(self, info: ModelInfo, tokens: int, remove: int | None, r: int | None) -> int:
        """Fix the decoder schedule for `tokens` visual tokens per image; returns the tokens it removes."""
        layers = llm_merge_layers(info, self.llm_start)
        if not layers:
            raise ValueError(f"{self.name}: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        schedule = constant(tokens, r or DEFAULT_R_LLM, layers) if remove is None else spread(remove, layers)
        self.llm_schedule = {layer: r for layer, r in schedule.items() if r > 0}
        self.llm_layers = tuple(self.llm_schedule)
        return sum(self.llm_schedule.values())

    def vision_layer(self, state: TokenState) -> TokenState:
        r = self.vision_schedule.get(state.layer, 0)
        if r == 0:
            return state
        return vision_step(state, r, self)

    def llm_layer(self, state: TokenState) -> TokenState:
        r = self.llm_schedule.get(state.layer, 0)
        return llm_step(state, r, self)


@register
class FiCoCoV(_FiCoCo):
    """FiCoCo-V: filter-correlate-compress inside the CLIP encoder, so `budget` tokens per image reach the LLM.

    Args:
        budget: patch tokens per image at the LLM input; N - budget removals spread over the merging layers.
        r: the code's constant-r mode when budget is None (default 42, README: 114 of 576 tokens remain).
            Give budget or r, not both.
        start_layer: first merging layer, counted on CLIP-L's 24 layers (paper/code: 12).
        lam: filter weight of the CLS term (0.35).
        epsilon: correlate quantile (0.998).
        window: side of the local-penalty windows on the patch grid (2).
        penalty_scale: local-penalty scaling coefficient (2).
        redundancy: "row" (official: attention a patch gives) or "column" (attention it receives).
        targets: "kept" (paper: non-source patches) or "any" (official: any token, itself and CLS included).
        cls_order: "paper" (CLS stays first) or "official" (the code's ordering bug; see the module docstring).
    """

    name = "ficoco-v"
    stages = frozenset({Stage.VISION_LAYER})
    # Its merge schedule is fixed at setup from the image's token count: rows must be whole images. The filter's
    # task term is CLS attention; without CLS the mean-key variant runs (module docstring).
    needs = frozenset({"single_view", "cls"})
    fallback_needs = frozenset({"vision_layers", "single_view"})
    fallback_label = "CLS-free"
    renumber_positions = True

    def __init__(
        self,
        budget: int | None = None,
        r: int | None = None,
        start_layer: int = 12,
        lam: float = 0.35,
        epsilon: float = 0.998,
        window: int = 2,
        penalty_scale: float = 2.0,
        redundancy: str = "row",
        targets: str = "kept",
        cls_order: str = "paper",
    ) -> None:
        super().__init__(budget)
        self.r = self._constant_r(budget, r)
        self._vision_args(start_layer, lam, epsilon, window, penalty_scale, redundancy, targets, cls_order)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        remove = None if self.budget is None else info.visual_tokens - self.budget
        self.budget = info.visual_tokens - self._setup_vision(info, remove, self.r)

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, schedule={self.vision_schedule}, lam={self.lam}, epsilon={self.epsilon}, "
            f"targets={self.targets!r}, cls_order={self.cls_order!r}"
        )


@register
class FiCoCoL(_FiCoCo):
    """FiCoCo-L: filter-correlate-compress inside the LLM decoder (prefill), `budget` tokens per image at its
    last layer.

    Args:
        budget: visual tokens per image reaching the last decoder layer; N - budget removals spread over the
            merging layers.
        r: the code's constant-r mode when budget is None (default 14). Give budget or r, not both.
        start_layer: first merging layer, counted on Vicuna's 32 layers (code: index > 4, so 5).
        beta: filter weight of the visual-redundancy term (0.6).
        gamma: correlate weight of the direct visual-visual term (0.6).
        epsilon: correlate quantile (0.998).
        targets: "kept" (paper: non-source visual tokens) or "any" (official: any other visual token).
        compress: "paper" (self-preserving average) or "official" (additive).
    """

    name = "ficoco-l"
    stages = frozenset({Stage.LLM_LAYER})
    # Its merge schedule is fixed at setup from the image's token count: every image must have that count.
    needs = frozenset({"single_view"})
    renumber_positions = True
    llm_hook_point = "attn"

    def __init__(
        self,
        budget: int | None = None,
        r: int | None = None,
        start_layer: int = 5,
        beta: float = 0.6,
        gamma: float = 0.6,
        epsilon: float = 0.998,
        targets: str = "kept",
        compress: str = "paper",
    ) -> None:
        super().__init__(budget)
        self.r = self._constant_r(budget, r)
        self._llm_args(start_layer, beta, gamma, epsilon, targets, compress)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        remove = None if self.budget is None else info.visual_tokens - self.budget
        self.budget = info.visual_tokens - self._setup_llm(info, info.visual_tokens, remove, self.r)

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, schedule={self.llm_schedule}, beta={self.beta}, gamma={self.gamma}, "
            f"epsilon={self.epsilon}, targets={self.targets!r}, compress={self.compress!r}"
        )


@register
class FiCoCoVL(_FiCoCo):
    """FiCoCo-VL: FiCoCo-V in the encoder, then FiCoCo-L in the decoder.

    Args:
        budget: visual tokens per image reaching the last decoder layer. The encoder removes
            round(vision_share * (N - budget)) (at most all patches but one), the decoder the rest.
        vision_share: fraction of the removals done in the encoder (0.5; the paper gives no split).
        r_vision, r_llm: constant-r mode when budget is None (defaults 42 and 14, both official switches on).
        vision_start, llm_start: first merging layers on CLIP-L's 24 / Vicuna's 32 layers (12, 5).
        lam, window, penalty_scale, redundancy, cls_order: FiCoCo-V's (see `FiCoCoV`).
        beta, gamma, compress: FiCoCo-L's (see `FiCoCoL`).
        epsilon, targets: both stages'.
    """

    name = "ficoco-vl"
    stages = frozenset({Stage.VISION_LAYER, Stage.LLM_LAYER})
    # Its encoder schedule is fixed at setup from the image's token count: rows must be whole images. The filter's
    # task term is CLS attention; without CLS the mean-key variant runs (module docstring).
    needs = frozenset({"single_view", "cls"})
    fallback_needs = frozenset({"vision_layers", "llm_layers", "single_view"})
    fallback_label = "CLS-free"
    renumber_positions = True
    llm_hook_point = "attn"

    def __init__(
        self,
        budget: int | None = None,
        vision_share: float = 0.5,
        r_vision: int | None = None,
        r_llm: int | None = None,
        vision_start: int = 12,
        llm_start: int = 5,
        lam: float = 0.35,
        beta: float = 0.6,
        gamma: float = 0.6,
        epsilon: float = 0.998,
        window: int = 2,
        penalty_scale: float = 2.0,
        redundancy: str = "row",
        targets: str = "kept",
        cls_order: str = "paper",
        compress: str = "paper",
    ) -> None:
        super().__init__(budget)
        self.vision_share = _fraction(self.name, "vision_share", vision_share)
        self.r_vision = _int(self.name, "r_vision (tokens merged per vision layer)", r_vision, 1, none_ok=True)
        self.r_llm = _int(self.name, "r_llm (tokens merged per LLM layer)", r_llm, 1, none_ok=True)
        if budget is not None and (r_vision is not None or r_llm is not None):
            raise ValueError(f"{self.name}: give budget ({budget}) or r_vision/r_llm ({r_vision}/{r_llm}), not both")
        self._vision_args(vision_start, lam, epsilon, window, penalty_scale, redundancy, targets, cls_order)
        self._llm_args(llm_start, beta, gamma, epsilon, targets, compress)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        n = info.visual_tokens
        if self.budget is None:
            removed_v = self._setup_vision(info, None, self.r_vision)
            removed_l = self._setup_llm(info, n - removed_v, None, self.r_llm)
        else:
            patches = info.grid[0] * info.grid[1]
            removed_v = min(math.floor(self.vision_share * (n - self.budget) + 0.5), patches - 1)
            self._setup_vision(info, removed_v, None)
            removed_l = self._setup_llm(info, n - removed_v, n - self.budget - removed_v, None)
        self.budget = n - removed_v - removed_l

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, vision={self.vision_schedule}, llm={self.llm_schedule}, "
            f"targets={self.targets!r}, cls_order={self.cls_order!r}, compress={self.compress!r}"
        )
