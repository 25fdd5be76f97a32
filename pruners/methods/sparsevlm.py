"""SparseVLM: Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang, "SparseVLM: Visual
Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025, arXiv 2410.04417; official code
`Gumpest/SparseVLMs` (v1 / v1.5 and v2.0 "SparseVLM+": `llava/model/language_model/{score,utils,
modelling_sparse_llama}.py`). METHODS.md §6.

Text-guided, training-free pruning inside the LLM prefill: the question decides which visual tokens stay.
Steps of this file:

  1. Text raters (paper Sec. 3.2; `text_relevance`, `above_mean`): from the LLM input embeddings E, the
     relevance M = softmax over the text axis of E_V E_T^T (visual rows, text columns, unscaled as official),
     averaged over the visual rows, gives rho_t per text token; the raters are the text tokens with
     rho_t > mean(rho). Text = the tokens after the sample's last visual token (question + " ASSISTANT:"), as
     official. Chosen once per prefill and reused at every pruning layer (text tokens are never pruned).
  2. Text-guided scoring (Sec. 3.3; `rater_attention`): after each LLM layer of `prune_layers` (2, 6, 15 of
     Vicuna's 32), that layer's head-mean attention probabilities (softmax(QK^T / sqrt(d)) with the causal
     mask, from the runtime's probe: the model stays on SDPA), rows = raters, columns = visual tokens,
     averaged over the raters: r_j. The top visual tokens by r_j are kept. The output of layer l is cut, so
     layer l + 1 is the first with fewer tokens (as official).
  3. Token recycling (Sec. 3.4; `recycle_counts`, `dpc_knn`, `cluster_means`): of the n dropped tokens the
     floor(0.3 n) + 1 with the highest r_j are clustered by DPC-kNN into floor(n' / 10) + 1 clusters on their
     layer-l output states: distance ||x_i - x_j|| / sqrt(d); density exp(-mean squared distance to the k
     nearest, k = the number of clusters, the point itself included); delta = distance to the nearest denser
     point (for the densest point: the largest distance in the set); centres = the top density * delta;
     every point joins its nearest centre; each cluster becomes its members' mean. The recycled tokens are
     visual tokens put right after the sample's visual block (after the kept visual tokens, before the
     text), in the order of their centres' score; a later stage may keep, drop or recycle them again
     (official: they count in the next stage's visual span).
  4. Positions (`positions`): "contiguous" (default; v1, the paper's version) renumbers the tokens after
     every cut contiguously (the runtime's `renumber_positions`); "original" (v2.0's policy) keeps each
     token's id, a recycled token taking the id of its cluster's centre.

Budgets. vtprune's `budget` is the number of visual tokens per image that reach the LLM's last layer; the
paper's 192 / 128 / 96 / 64 are averages over the 32 layers (official per-stage kept counts
`PAPER_SCHEDULES`, e.g. 64 -> keep 66, 30, 17 at layers 2, 6, 15; with recycling 576 -> 82 -> 32 -> 18).
  * schedule="budget" (default): the last stage leaves exactly `budget` x images visual tokens, kept plus
    recycled. Earlier stages follow the shape of the paper's schedule: with the official counts v_s of the
    paper row nearest to budget * 576 / N (N = the model's visual tokens per image), stage s leaves
    round(N * (budget / N) ** f_s), f_s = ln(v_s / 576) / ln(v_last / 576): each stage sits at the paper's
    fraction of the (geometric) way from N down to the final count. At 576 tokens, budget 64 leaves
    167, 92, 64; 128 leaves 409, 236, 128; 192 leaves 378, 286, 192. Each stage keeps the largest k with
    k + clusters(N_present - k) <= target, which is then met exactly (k + clusters grows by 0 or 1 as k
    grows); only where even k = 0 would give more clusters than the target (targets of 1 or 2 tokens) are
    fewer clusters made than the paper's rule.
  * schedule="paper": the official kept counts literally (`PAPER_SCHEDULES[budget]`, budget one of 64, 96,
    128, 192; counts scaled by N / 576 on other models), with the official top-k of min(k, present - 1).
    The report's `visual_tokens_layer_mean` is then the number to compare with the paper's budget (the
    official code's own accounting); `visual_tokens` (last layer) is smaller (18 for "64").

Raters and the runtime. The raters are read from the LLM input embeddings, as the paper does: the runtime
hands every LLM hook `state.extras["input_embeds"]` (the input embeddings of the tokens present,
slot-aligned). They are chosen at the first pruning layer and kept by origin for the later ones.

Layer schedules are given for Vicuna-7B (32 layers) and mapped to other depths with `pruners.base.scale_layers`,
then clipped to 0..llm_layers - 2: 2, 6, 15 become 0, 1, 2 on a 4-layer decoder. Stages that land on the same
layer merge into the later one.

Deviations from the official code:
  * Batch: the official code is batch 1 with a fixed system-prompt length; here the visual and text spans are
    found per sample, and with several images in a sample all its visual tokens are pruned jointly
    (budget x images) and the text is what follows its last visual token.
  * DPC-kNN adds random noise (1e-6) to the densities to break ties; here ties go to the earlier candidate
    (the higher-scored token), so results are deterministic and batched equals one-by-one. Distances,
    densities and means are computed in float32 (official: the model dtype); the cluster mean has no
    1e-6 in its denominator.
  * No rater (every relevance equal, e.g. one text token): all text tokens rate (official: an empty mean,
    NaN scores). A sample without text after its image: its last token rates.
  * Budget mode keeps min(k, present) rather than the official min(k, present - 1), so a stage with nothing
    to drop is a no-op and the keep-everything budget reproduces the unpruned model.
  * Decoding positions: the official v1 code continues decoding at the unpruned length (SDPA path) or at each
    layer's cache length (FlashAttention path); here one scheme for every layer, the runtime's shift by the
    tokens pruned (as for MustDrop).
  * v2.0's other changes (RoPE-bias correction, top-14 heads, no recycling, its schedules) are not
    implemented; `recycle=False` gives the no-recycling variant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index, top_mask
from ..registry import register

PAPER_LLM_DEPTH = 32  # Vicuna-7B, for which prune_layers are given
PAPER_VISUAL_TOKENS = 576  # LLaVA-1.5, for which the schedules are given
# Official v1 kept counts at layers 2, 6, 15 by the (layer-average) budget they report (score.py).
PAPER_SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
DEFAULT_BUDGET = 192  # official RETAIN_TOKN default
SCHEDULES = ("budget", "paper")
POSITIONS = ("contiguous", "original")
INPUT_EMBEDS = "input_embeds"  # extras key of the slot-aligned LLM input embeddings (pruners.runtime.decoder)
ROW_CHUNK = 256  # rater rows per probe call: bounds the (B, heads, rows, N) float32 buffer


# -- step 1: text raters -------------------------------------------------------------------------
def text_slots(state: TokenState) -> Tensor:
    """(B, N) bool: valid non-visual slots after the sample's last visual slot (the question)."""
    slots = torch.arange(state.num_tokens, device=state.valid.device)
    last_visual = torch.where(state.visual & state.valid, slots, -1).amax(-1, keepdim=True)
    return state.valid & ~state.visual & (slots > last_visual)


def text_relevance(embeds: Tensor, visual: Tensor, text: Tensor) -> Tensor:
    """(B, N) relevance rho_t of each text slot (0 elsewhere): softmax over the text of E_V E_T^T, mean over
    the visual rows (paper Sec. 3.2)."""
    v_idx, t_idx = compact_index(visual), compact_index(text)
    e = embeds.float()

    def take(index: Tensor) -> Tensor:
        return torch.gather(e, 1, index.clamp(min=0)[..., None].expand(-1, -1, e.shape[-1]))

    logits = take(v_idx) @ take(t_idx).transpose(1, 2)  # (B, V, T)
    probs = logits.masked_fill((t_idx < 0)[:, None, :], float("-inf")).softmax(-1)
    probs = torch.where((v_idx >= 0)[..., None] & (t_idx >= 0)[:, None, :], probs, 0.0)  # padding rows: NaN -> 0
    rho = probs.sum(1) / (v_idx >= 0).sum(-1, keepdim=True).clamp_min(1)
    out = torch.zeros(visual.shape, dtype=rho.dtype, device=rho.device)
    return out.scatter_add(1, t_idx.clamp(min=0), torch.where(t_idx >= 0, rho, 0.0))


def above_mean(relevance: Tensor, text: Tensor) -> Tensor:
    """(B, N) bool raters: text slots whose relevance is above the mean over the sample's text. Where none is
    (all equal), every text slot rates."""
    mean = (relevance * text).sum(-1, keepdim=True) / text.sum(-1, keepdim=True).clamp_min(1)
    raters = text & (relevance > mean)
    return torch.where(raters.any(-1, keepdim=True), raters, text)


def rater_attention(state: TokenState, raters: Tensor) -> Tensor:
    """(B, N) head-mean attention each slot receives from the raters, averaged over them (paper Sec. 3.3)."""
    rows = compact_index(raters)
    total = torch.zeros(state.valid.shape, device=state.hidden.device)
    for start in range(0, rows.shape[1], ROW_CHUNK):
        index = rows[:, start : start + ROW_CHUNK]
        attn = state.attention(index.clamp(min=0))  # (B, R, N)
        total += torch.where((index >= 0)[..., None], attn, 0.0).sum(1)  # padding rows selected away
    return total / raters.sum(-1, keepdim=True).clamp_min(1)


# -- step 3: recycling ---------------------------------------------------------------------------
def recycle_counts(dropped: Tensor, ratio: float = 0.3, per_cluster: int = 10) -> tuple[Tensor, Tensor]:
    """Candidates n' = floor(ratio * n) + 1 and clusters floor(n' / per_cluster) + 1 for n dropped tokens
    (official `int(n * 0.3) + 1`, `int(n' / 10) + 1`); both 0 where nothing is dropped."""
    some = dropped > 0
    cand = torch.minimum(torch.floor(dropped.double() * ratio).long() + 1, dropped)
    clusters = torch.minimum(cand // per_cluster + 1, cand)
    return torch.where(some, cand, 0), torch.where(some, clusters, 0)


def split_target(present: Tensor, target: Tensor, ratio: float, per_cluster: int) -> tuple[Tensor, Tensor]:
    """(kept, clusters) per sample leaving exactly `target` (B,) of `present` (B,) visual tokens: the largest
    k with k + clusters(present - k) <= target (met exactly: the sum grows by 0 or 1 with k). Where even k = 0
    gives too many clusters, target clusters are made instead."""
    target = torch.minimum(target, present)
    ks = torch.arange(int(target.max()) + 1 if target.numel() else 1, device=present.device)
    left = (present[:, None] - ks).clamp(min=0)
    _, clusters = recycle_counts(left, ratio, per_cluster)
    fits = (ks <= target[:, None]) & (ks + clusters <= target[:, None])
    kept = torch.where(fits, ks, -1).amax(-1).clamp(min=0)
    kept = torch.where(present <= target, present, kept)
    return kept, target - kept


def dpc_knn(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of each row's valid points (official `cluster_and_merge`, Sec. 3.4).

    Args:
        x: (B, M, D) points; valid: (B, M) bool; clusters: (B,) long, 1..valid points (0 for a row without any).

    Returns:
        assign (B, M): cluster of each point (-1 for padding); centre (B, C): point index of each cluster's
        centre, by descending density * delta (-1 past a row's cluster count). Ties (equal density, score or
        distance) go to the earlier point / centre.
    """
    bsz, m, dim = x.shape
    idx = torch.arange(m, device=x.device)
    pair = valid[:, :, None] & valid[:, None, :]
    dist = torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(dim)
    near = dist.masked_fill(~pair, float("inf")).sort(-1).values  # row i: its distances, nearest (itself) first
    k = clusters.clamp(min=1)[:, None, None]
    sq = torch.where(idx < k, near, 0.0).square().sum(-1)
    density = torch.exp(-sq / k[..., 0]).masked_fill(~valid, -1.0)
    # j is denser than i: higher density, or equal density and earlier (a total order, no random noise).
    higher = density[:, None, :] > density[:, :, None]
    tie = (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])
    denser = (higher | tie) & pair
    delta = torch.where(denser, dist, float("inf")).amin(-1)
    largest = dist.masked_fill(~pair, 0.0).flatten(1).amax(-1, keepdim=True)
    delta = torch.where(torch.isinf(delta), largest, delta)
    score = (delta * density).masked_fill(~valid, float("-inf"))
    width = max(int(clusters.max()) if clusters.numel() else 0, 1)
    centre = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :width]
    has = torch.arange(width, device=x.device) < clusters[:, None]
    to_centre = torch.gather(dist, 2, centre[:, None, :].expand(-1, m, -1)).masked_fill(~has[:, None, :], float("inf"))
    assign = to_centre.argmin(-1)  # first minimum: the earlier centre
    own = torch.full_like(assign, -1).scatter(1, centre, torch.where(has, torch.arange(width, device=x.device), -1))
    assign = torch.where(own >= 0, own, assign).masked_fill(~valid, -1)  # a centre joins its own cluster
    return assign, centre.masked_fill(~has, -1)


def cluster_means(x: Tensor, assign: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(B, C, D) float32 mean of each cluster's points and (B, C) member counts; assign -1 = no cluster."""
    dump = torch.where(assign >= 0, assign, width)  # padding goes to an extra column, then dropped
    sums = torch.zeros(x.shape[0], width + 1, x.shape[-1], device=x.device)
    sums = sums.scatter_add(1, dump[..., None].expand(-1, -1, x.shape[-1]), x.float())
    counts = torch.zeros(x.shape[0], width + 1, device=x.device).scatter_add(
        1, dump, torch.ones_like(x[..., 0]).float()
    )
    return sums[:, :width] / counts[:, :width].clamp_min(1)[..., None], counts[:, :width]


# -- small helpers -------------------------------------------------------------------------------
def official_counts(
    keep: tuple[int, ...], visual: int = PAPER_VISUAL_TOKENS, ratio: float = 0.3, per_cluster: int = 10
) -> list[int]:
    """Visual tokens after each stage of the official code (kept min(k, v - 1) plus recycled), batch 1."""
    counts, v = [], visual
    for k in keep:
        kept = max(min(k, v - 1), 0)
        _, clusters = recycle_counts(torch.tensor([v - kept]), ratio, per_cluster)
        v = kept + int(clusters[0])
        counts.append(v)
    return counts


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"sparsevlm: {name} must be an int >= {low}, got {value!r}")
    return value


@register
class SparseVLM(Pruner):
    """Text-guided visual token pruning with recycling at LLM layers 2, 6, 15 (prefill).

    Args:
        budget: visual tokens per image at the LLM's last layer (schedule="budget"), or the paper's
            layer-average budget naming a row of `PAPER_SCHEDULES` (schedule="paper": 64, 96, 128 or 192).
            None: the official default 192 (budget mode: 192 * N / 576, rounded).
        schedule: "budget" (default, exact count at the last layer) or "paper" (the official kept counts);
            see the module docstring.
        prune_layers: the three LLM layers whose output is pruned, for a 32-layer decoder (official 2, 6, 15;
            scaled to the model's depth in `setup`).
        recycle: recycle dropped tokens by clustering (official v1 True; v2.0 has none).
        recycle_ratio: fraction of the dropped tokens that are clustered, floor(ratio * n) + 1 (official 0.3),
            in (0, 1].
        tokens_per_cluster: clusters = floor(n' / tokens_per_cluster) + 1 (official 10), >= 1.
        positions: "contiguous" (v1, default) or "original" (v2.0's policy); see the module docstring.
    """

    name = "sparsevlm"
    stages = frozenset({Stage.LLM_LAYER})
    renumber_positions = True

    def __init__(
        self,
        budget: int | None = None,
        schedule: str = "budget",
        prune_layers: tuple[int, ...] = (2, 6, 15),
        recycle: bool = True,
        recycle_ratio: float = 0.3,
        tokens_per_cluster: int = 10,
        positions: str = "contiguous",
    ) -> None:
        super().__init__(budget)
        if schedule not in SCHEDULES:
            raise ValueError(f"sparsevlm: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "paper" and budget is not None and budget not in PAPER_SCHEDULES:
            raise ValueError(
                f"sparsevlm: schedule='paper' has no row for budget {budget}; allowed: "
                f"{', '.join(map(str, sorted(PAPER_SCHEDULES)))} (or schedule='budget' for any count)"
            )
        if isinstance(prune_layers, int) or len(prune_layers) != 3:
            raise ValueError(f"sparsevlm: prune_layers must be 3 increasing layer indices >= 0, got {prune_layers!r}")
        layers = tuple(_check_int("prune_layers entry", layer, 0) for layer in prune_layers)
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"sparsevlm: prune_layers must be 3 increasing layer indices >= 0, got {prune_layers!r}")
        if not isinstance(recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be True or False, got {recycle!r}")
        ok = isinstance(recycle_ratio, (int, float)) and not isinstance(recycle_ratio, bool)
        if not (ok and 0 < recycle_ratio <= 1):
            raise ValueError(f"sparsevlm: recycle_ratio must be a number in (0, 1], got {recycle_ratio!r}")
        if positions not in POSITIONS:
            raise ValueError(f"sparsevlm: positions must be one of {POSITIONS}, got {positions!r}")
        self.schedule, self.prune_layers, self.recycle = schedule, layers, recycle
        self.recycle_ratio = float(recycle_ratio)
        self.tokens_per_cluster = _check_int("tokens_per_cluster", tokens_per_cluster, 1)
        self.positions = positions
        self.renumber_positions = positions == "contiguous"  # the runtime reads it per instance
        self.prune_at: tuple[int, ...] = ()
        self.stage_counts: tuple[int, ...] = ()  # per image: tokens left (budget) or kept (paper) per stage
        self._raters: Tensor | None = None

    def setup(self, info: ModelInfo) -> None:
        if self.schedule == "paper":  # the budget names a schedule row, not a count on this model
            self.budget = DEFAULT_BUDGET if self._budget_arg is None else self._budget_arg
            self.info = info
        else:
            super().setup(info)
            if self.budget is None:
                self.budget = max(1, math.floor(DEFAULT_BUDGET * info.visual_tokens / PAPER_VISUAL_TOKENS + 0.5))
        if info.llm_layers < 2:
            raise ValueError(f"sparsevlm: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        stage_layers = [
            min(scale_layers((layer,), PAPER_LLM_DEPTH, info.llm_layers)[0], info.llm_layers - 2)
            for layer in self.prune_layers
        ]
        counts = self._paper_counts(info) if self.schedule == "paper" else self._budget_counts(info)
        by_layer = dict(zip(stage_layers, counts))  # stages on the same layer: the later one wins
        self.prune_at, self.stage_counts = tuple(by_layer), tuple(by_layer.values())
        self.llm_layers = self.prune_at
        self.check_layers(self.llm_layers, info.llm_layers, "llm_layers")

    def _paper_counts(self, info: ModelInfo) -> list[int]:
        scale = info.visual_tokens / PAPER_VISUAL_TOKENS
        return [math.floor(k * scale + 0.5) for k in PAPER_SCHEDULES[self.budget]]

    def paper_row(self, info: ModelInfo) -> int:
        """The paper budget whose schedule shapes budget mode: nearest to budget * 576 / N (ties: smaller)."""
        equivalent = self.budget * PAPER_VISUAL_TOKENS / info.visual_tokens
        return min(sorted(PAPER_SCHEDULES), key=lambda row: abs(row - equivalent))

    def _budget_counts(self, info: ModelInfo) -> list[int]:
        n, budget = info.visual_tokens, self.budget
        paper = official_counts(PAPER_SCHEDULES[self.paper_row(info)], PAPER_VISUAL_TOKENS, 0.3, 10)
        shape = [math.log(v / PAPER_VISUAL_TOKENS) / math.log(paper[-1] / PAPER_VISUAL_TOKENS) for v in paper]
        counts = [min(n, max(budget, math.floor(n * (budget / n) ** f + 0.5))) for f in shape[:-1]]
        return [*counts, budget]

    # -- prefill hook ----------------------------------------------------------------------------
    def llm_layer(self, state: TokenState) -> TokenState:
        if state.layer == self.llm_layers[0] or self._raters is None or len(self._raters) != state.batch_size:
            self._raters = self._rater_table(state)
        if state.layer not in self.prune_at:
            return state
        visual = state.visual & state.valid
        present = visual.sum(-1)
        kept_n, clusters = self._stage_split(state, present)
        if bool((kept_n == present).all()) and not bool(clusters.any()):
            return state  # nothing to drop: no cut (positions stay as they are)
        raters = self._raters.gather(1, state.origin.clamp(min=0)) & state.valid & ~state.visual
        scores = rater_attention(state, raters)
        kept = top_mask(scores, visual, kept_n)
        return self._cut(state, scores, kept, clusters)

    def _rater_table(self, state: TokenState) -> Tensor:
        """(B, max origin + 1) bool: the raters, indexed by origin (stable across cuts)."""
        embeds = state.extras.get(INPUT_EMBEDS)
        if embeds is None:
            raise RuntimeError("sparsevlm: the runtime offers no extras['input_embeds'] (the LLM input embeddings)")
        text = text_slots(state)
        raters = above_mean(text_relevance(embeds, state.visual & state.valid, text), text)
        # A sample with no text after its visual tokens: its last token rates.
        last = torch.zeros_like(raters).scatter(1, state.last_index()[:, None], True)
        raters = torch.where(raters.any(-1, keepdim=True), raters, last & state.valid)
        width = int(state.origin.max()) + 2
        table = torch.zeros(state.batch_size, width, dtype=torch.bool, device=raters.device)
        # Column 0 collects the padding slots and is dropped.
        return table.scatter(1, torch.where(state.valid, state.origin + 1, 0), raters & state.valid)[:, 1:]

    def _stage_split(self, state: TokenState, present: Tensor) -> tuple[Tensor, Tensor]:
        """(kept, clusters) per sample at this stage."""
        images = state.num_images
        if images is None:  # no count given: one image per sample
            images = torch.ones_like(present)
        count = self.stage_counts[self.prune_at.index(state.layer)] * images.to(present.device)
        if self.schedule == "budget":
            if not self.recycle:
                return torch.minimum(count, present), torch.zeros_like(present)
            return split_target(present, count, self.recycle_ratio, self.tokens_per_cluster)
        kept = torch.minimum(count, present - 1).clamp(min=0)  # official top-k of min(k, present - 1)
        if not self.recycle:
            return kept, torch.zeros_like(present)
        return kept, recycle_counts(present - kept, self.recycle_ratio, self.tokens_per_cluster)[1]

    def _cut(self, state: TokenState, scores: Tensor, kept: Tensor, clusters: Tensor) -> TokenState:
        """Keep `kept`, recycle the best dropped tokens into `clusters` (B,) cluster means after the visual block."""
        visual = state.visual & state.valid
        dropped = visual & ~kept
        cand_n, _ = recycle_counts(dropped.sum(-1), self.recycle_ratio, self.tokens_per_cluster)
        cand_n = torch.where(clusters > 0, torch.maximum(cand_n, clusters), 0)
        hidden, sizes = state.hidden, state.sizes
        recycled = torch.zeros_like(visual)
        rank = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
        if bool(clusters.any()):
            # Candidates: the cand_n highest-scoring dropped tokens, best first (the official order).
            masked = scores.float().nan_to_num(nan=float("-inf")).masked_fill(~dropped, float("-inf"))
            width = int(cand_n.max())
            cand = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :width]
            cand_ok = torch.arange(width, device=visual.device) < cand_n[:, None]
            points = torch.gather(hidden, 1, cand[..., None].expand(-1, -1, hidden.shape[-1]))
            assign, centre = dpc_knn(points, cand_ok, clusters)
            means, _ = cluster_means(points, assign, centre.shape[1])
            member_sizes = torch.zeros(centre.shape, device=visual.device).scatter_add(
                1, torch.where(assign >= 0, assign, 0), torch.gather(sizes, 1, cand).float() * cand_ok
            )
            # Each cluster lives on in its centre's slot (origin, and with positions="original" the id).
            b, c = (centre >= 0).nonzero(as_tuple=True)
            slot = cand[b, centre[b, c]]
            hidden, sizes = hidden.clone(), sizes.clone()
            hidden[b, slot] = means[b, c].to(hidden.dtype)
            sizes[b, slot] = member_sizes[b, c].to(sizes.dtype)
            recycled[b, slot] = True
            rank[b, slot] = c
        return state.replace(hidden=hidden, sizes=sizes).keep(self._order(state, kept, recycled, rank))

    @staticmethod
    def _order(state: TokenState, kept: Tensor, recycled: Tensor, rank: Tensor) -> Tensor:
        """Keep-index (B, K): the kept slots in order, the recycled ones (by `rank`) right after the sample's
        last visual slot; dropped slots become the left padding."""
        n = state.num_tokens
        slots = torch.arange(n, device=state.valid.device).expand_as(state.valid)
        anchor = torch.where(state.visual & state.valid, slots, -1).amax(-1, keepdim=True)
        key = torch.where(recycled, (2 * anchor + 1) * (n + 1) + rank, 2 * slots * (n + 1))
        keep = (state.valid & ~state.visual) | kept | recycled
        key = key.masked_fill(~keep, -1)  # dropped first: they become the left padding
        sorted_key, order = key.sort(dim=-1, stable=True)
        width = int(keep.sum(-1).max())
        return order[:, n - width :].masked_fill(sorted_key[:, n - width :] < 0, -1)

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, schedule={self.schedule!r}, prune_at={self.prune_at}, "
            f"stage_counts={self.stage_counts}, recycle={self.recycle}, recycle_ratio={self.recycle_ratio}, "
            f"tokens_per_cluster={self.tokens_per_cluster}, positions={self.positions!r}"
        )
