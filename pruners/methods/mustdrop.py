"""MustDrop: Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient
Multimodal Large Language Model", arXiv 2411.10803 (2024); official code `liuting20/MustDrop`
(snapshot 909afa5: `multimodal_encoder/{clip_encoder,local_merge}.py`,
`language_model/modelling_sparse_llama.py`). LightCompress' `mustdrop.py` implements stage 1 only.

The paper's full text could not be read (METHODS.md §8); the steps below follow the abstract's four
components and the official code as described in METHODS.md §1. Steps of this file:

  1. Vision encoding, "local spatial merging" (METHODS §1.1a; `vision_layer`): after CLIP layer
     `merge_layer` (0) split the patch grid into non-overlapping `window` x `window` (3 x 3) windows.
     A window's similarity s_g is the mean cosine similarity over its ordered token pairs a != b.
     Every window with s_g >= `tau` (0.8) is merged into the size-weighted mean of its tokens; the
     sizes are not used in later attention (no proportional attention, as official). CLS never
     merges. CLIP layers after the merge run on the shorter sequence.
  2. Vision encoding, "key token set" (METHODS §1.1b; `vision_output`): the CLS attention (head
     mean, softmax) of the CLIP layer that takes the LLM's features as its input (layer 23 of
     CLIP-L; offered by the runtime as `extras["vision_attention"]`). The top
     ceil(`key_ratio` * N) patches (0.08; 47 of 576), N = the image's current patch count, are
     flagged in `TokenState.protected`; the runtime carries the flag into the LLM sequence.
  3. Prefill, "dual-attention filtering" (METHODS §1.2; `llm_layer`): after LLM layers
     `prune_layers` (2, 6, 10, 14 of Vicuna's 32) take the head-mean softmax attention A of the
     text tokens after the visual block (question + " ASSISTANT:") to the visual tokens.
     Global G_j = sum_t A[t, j], individual M_j = max_t A[t, j]. Token j is dropped iff
     G_j < `global_thr` * sum_k G_k AND M_j < `individual_thr`; protected tokens are never dropped.
     Kept tokens are renumbered contiguously (`renumber_positions = True`, as official).
  4. Decoding, "output-aware cache policy" (METHODS §1.3; `decode`): at the first decoding step
     the KV caches of layers first..last pruning layer (layers 2..14; they saw tokens a later cut
     dropped) keep only the final survivors (the tokens present at the last layer). Earlier layers
     keep their full cache; later layers already hold only the survivors (as official).

Threshold mode (`budget=None`, the paper's): the count is adaptive per sample. The official scripts
pair thresholds with the budgets they report, counted as the mean over the 32 layers of the visual
tokens (the paper's "equal token number"; the report's `visual_tokens_layer_mean`):
`OFFICIAL_THRESHOLDS` (192 -> (1e-3, 1e-3), 128 -> (1.2e-3, 1e-3), 64 -> (1.1e-2, 1e-2); VizWiz 64
used (5e-3, 1e-3)). They were tuned for LLaVA-1.5-7B; other models need their own.

Budget mode (ours, not the paper's): exactly `budget` visual tokens per image reach the LLM's last
layer. The three stages stay; (a) at most floor((N0 - budget) / (window^2 - 1)) windows merge (the
most similar of those above `tau`), so at least `budget` tokens enter the LLM; (b) the key set is
capped at `budget` (highest CLS attention kept); (c) each pruning layer keeps
round(n * (target / n) ** (1 / layers_left)) visual tokens (a geometric schedule from the count n
entering the LLM down to target = budget x images at the last pruning layer), ranked protected
first, then by max(G_j / (global_thr * sum_k G_k), M_j / individual_thr): a token is "weak" under
the paper's AND rule exactly when this score is < 1, so the ranking agrees with the rule.

LLaVA-NeXT (multi-view images): stages 1 and 1b run in every view's CLIP pass (base and crops, each with
its own CLS); in budget mode each view's merges and key set are capped by its share of the image's budget
(`TokenState.quota`), and the LLM stage keeps budget x images over all views. Windows holding a patch that
unpadding drops never merge. The official LLaVA-NeXT code uses the flat merge (views concatenated, no
unpadding, no newlines); here HF's layout stays (see `pruners.runtime.llava_next`), so `order` has no effect.

Layer schedules are given for Vicuna-7B (32 layers) and CLIP-L (24 layers) and mapped to other
depths with `pruners.base.scale_layers`; LLM layers are then clipped to 0..llm_layers-2 (a cut
after the last layer changes nothing): 2, 6, 10, 14 become 0, 1, 2 on a 4-layer decoder.

Image-token order (`order`). The runtime puts every visual token in the image slot named by its
`positions`, so the slot order is the order the LLM sees (and the RoPE positions before the first
LLM cut). "official" (default) reproduces the official sequence [merged tokens in descending s_g,
then unmerged patches in raster order] by setting each visual token's `positions` to its rank in
that sequence (the image's visual tokens fill its first slots, contiguously, as official). "raster"
keeps every token at its own patch index, a merged token at its window's top-left patch (a flagged
deviation). With no merged window the two are identical.

Deviations from the official code:
  * Grids not divisible by the window (8 x 8 on the tiny test model): only full windows merge;
    the patches of partial edge windows are never merged (the official code asserts divisibility).
  * With batch > 1 the official merge uses the batch minimum of the number of windows above tau;
    here every image merges its own windows, so batched equals one-by-one (ragged counts).
  * The official code is batch 1 with a hard-coded system-prompt length of 35; here the visual and
    text spans are found per sample. With several images in a sample the rows are the text after
    its last visual token and all its visual tokens are candidates.
  * Positions: contiguous from the LLM input on, as official (the runtime renumbers the merged
    sequence and every cut, `renumber_positions`). During decoding the official code gives the new token, in each
    layer, that layer's cache length, so layers before the first pruning layer (full cache) use
    other positions than the rest; we do not replicate this: one position scheme for every layer,
    the runtime's renumbering shift.
  * The key token set is read from the attention of the layer after the feature layer, computed
    from the features themselves, as official (METHODS §1.1b notes the layer 22/23 mismatch).
  * Ties (equal similarity, attention or score) go to the earlier window / slot (stable sorts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index, cosine_similarity, row_rank, top_mask, topk_visual
from ..registry import register

PAPER_LLM_DEPTH = 32  # Vicuna-7B, for which prune_layers are given
PAPER_VISION_DEPTH = 24  # CLIP ViT-L/14, for which merge_layer is given
ORDERS = ("official", "raster")
# (global_thr, individual_thr) of the official LLaVA-1.5-7B scripts, by the budget they report.
OFFICIAL_THRESHOLDS = {192: (1e-3, 1e-3), 128: (1.2e-3, 1e-3), 64: (1.1e-2, 1e-2)}
ROW_CHUNK = 256  # text query rows per probe call: bounds the (B, heads, rows, L) float32 buffer


def window_patches(grid: tuple[int, int], window: int) -> Tensor:
    """(G, window^2) row-major patch indices of the full windows of a grid, windows in raster order.

    Partial windows at the right and bottom edges are left out: their patches never merge.
    """
    rows, cols = grid
    r = torch.arange(rows // window * window).view(-1, window)  # (windows down, window)
    c = torch.arange(cols // window * window).view(-1, window)  # (windows across, window)
    index = r[:, None, :, None] * cols + c[None, :, None, :]  # (down, across, window, window)
    return index.reshape(-1, window * window)


def window_similarity(tokens: Tensor) -> Tensor:
    """(B, G) mean cosine similarity over the ordered pairs a != b of each window (B, G, k, D)."""
    k = tokens.shape[-2]
    sims = cosine_similarity(tokens, tokens)  # (B, G, k, k)
    off = ~torch.eye(k, dtype=torch.bool, device=tokens.device)
    return (sims * off).sum((-1, -2)) / (k * (k - 1))


def dual_attention(state: TokenState) -> tuple[Tensor, Tensor]:
    """Global (sum) and individual (max) head-mean attention that each slot receives from the text
    after the visual block: (B, N) each. Rows are the valid non-visual slots after a sample's last
    visual slot; a sample without such rows gets zeros."""
    bsz, n = state.valid.shape
    slots = torch.arange(n, device=state.valid.device)
    last_visual = torch.where(state.visual & state.valid, slots, -1).amax(-1, keepdim=True)
    rows = compact_index(state.valid & ~state.visual & (slots > last_visual))
    total = torch.zeros(bsz, n, device=state.hidden.device)
    peak = torch.zeros(bsz, n, device=state.hidden.device)
    for start in range(0, rows.shape[1], ROW_CHUNK):
        index = rows[:, start : start + ROW_CHUNK]
        attn = state.attention(index.clamp(min=0))  # (B, R, N), head mean
        # Left-padding rows (index -1) are selected away, never multiplied (they may hold NaN).
        attn = torch.where((index >= 0)[..., None], attn, 0.0)
        total += attn.sum(1)
        peak = torch.maximum(peak, attn.amax(1))
    return total, peak


def _check_fraction(name: str, value, low: float, high: float, open_low: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"mustdrop: {name} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"mustdrop: {name} must be an int >= {low}, got {value!r}")
    return value


@register
class MustDrop(Pruner):
    """Multi-stage token dropping: window merge and key set in CLIP, dual-attention filtering in the
    LLM prefill, output-aware KV cache trimming at decode.

    Args:
        budget: visual tokens per image at the LLM's last layer (budget mode, ours). None: the
            paper's threshold mode (adaptive count per sample).
        window: side of the merge windows (official 3).
        tau: merge threshold on a window's mean pairwise cosine similarity (official 0.8;
            LightCompress uses 0.6), in [-1, 1].
        key_ratio: fraction of an image's patches in the key token set (official 0.08), in [0, 1].
        global_thr: theta_g, fraction of the summed global attention (official script default
            1e-3; see `OFFICIAL_THRESHOLDS`), in (0, 1].
        individual_thr: theta_i, bound on the max attention from one text token (1e-3), in (0, 1].
        prune_layers: LLM layers after which the filter runs, for a 32-layer decoder (official
            2, 6, 10, 14; scaled to the model's depth in `setup`).
        merge_layer: CLIP layer after which windows merge, for a 24-layer CLIP (official 0).
        order: "official" (merged tokens first, by descending similarity) or "raster"; see the
            module docstring.
        output_aware_cache: trim the caches of the pruning layers to the final survivors at the
            first decoding step (official True).
    """

    name = "mustdrop"
    stages = frozenset({Stage.VISION_LAYER, Stage.VISION_OUTPUT, Stage.LLM_LAYER, Stage.DECODE})
    needs = frozenset({"cls", "vision_attention"})  # the key token set ranks patches by CLS attention
    renumber_positions = True

    def __init__(
        self,
        budget: int | None = None,
        window: int = 3,
        tau: float = 0.8,
        key_ratio: float = 0.08,
        global_thr: float = 1e-3,
        individual_thr: float = 1e-3,
        prune_layers: tuple[int, ...] = (2, 6, 10, 14),
        merge_layer: int = 0,
        order: str = "official",
        output_aware_cache: bool = True,
    ) -> None:
        super().__init__(budget)
        self.window = _check_int("window", window, 2)
        self.tau = _check_fraction("tau", tau, -1.0, 1.0, open_low=False)
        self.key_ratio = _check_fraction("key_ratio", key_ratio, 0.0, 1.0, open_low=False)
        self.global_thr = _check_fraction("global_thr", global_thr, 0.0, 1.0, open_low=True)
        self.individual_thr = _check_fraction("individual_thr", individual_thr, 0.0, 1.0, open_low=True)
        if isinstance(prune_layers, int) or not prune_layers:
            raise ValueError(f"mustdrop: prune_layers must be a non-empty list of ints >= 0, got {prune_layers!r}")
        self.prune_layers = tuple(_check_int("prune_layers entry", layer, 0) for layer in prune_layers)
        self.merge_layer = _check_int("merge_layer", merge_layer, 0)
        if order not in ORDERS:
            raise ValueError(f"mustdrop: order must be one of {ORDERS}, got {order!r}")
        if not isinstance(output_aware_cache, bool):
            raise ValueError(f"mustdrop: output_aware_cache must be True or False, got {output_aware_cache!r}")
        self.order, self.output_aware_cache = order, output_aware_cache

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.llm_layers < 2:
            raise ValueError(f"mustdrop: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        scaled = scale_layers(self.prune_layers, PAPER_LLM_DEPTH, info.llm_layers)
        self.llm_layers = tuple(sorted({min(layer, info.llm_layers - 2) for layer in scaled}))
        self.vision_layers = scale_layers((self.merge_layer,), PAPER_VISION_DEPTH, info.vision_layers)
        if self.vision_layers[0] >= info.vision_feature_layer:
            raise ValueError(
                f"mustdrop: merge_layer {self.merge_layer} (layer {self.vision_layers[0]} of this encoder) is out of "
                f"range: allowed 0..{info.vision_feature_layer - 1} (layers whose output reaches the LLM)"
            )
        if self.key_ratio > 0 and not (info.has_cls and info.vision_feature_layer < info.vision_layers):
            raise ValueError(
                f"mustdrop: key_ratio {self.key_ratio} needs a CLS token and a vision layer after the feature layer "
                f"{info.vision_feature_layer}; this encoder has neither; allowed key_ratio: 0"
            )

    # -- stage 1: local spatial merging (CLIP) -------------------------------------------------
    def vision_layer(self, state: TokenState) -> TokenState:
        if state.layer not in self.vision_layers:
            return state
        windows = window_patches(state.grid, self.window).to(state.valid.device)  # (G, k)
        if windows.numel() == 0:
            return state
        members = self._window_slots(state)[:, windows]  # (B, G, k) slots of each window's patches
        bsz, n_win, k = members.shape
        width = state.hidden.shape[-1]
        tokens = torch.gather(state.hidden, 1, members.view(bsz, -1, 1).expand(-1, -1, width)).view(bsz, n_win, k, -1)
        score = window_similarity(tokens)
        # A window with a patch that is not visual (one LLaVA-NeXT's unpadding drops) never merges.
        whole = torch.gather(state.visual, 1, members.view(bsz, -1)).view(bsz, n_win, k).all(-1)
        score = score.masked_fill(~whole, float("-inf"))
        rank = row_rank(score)
        chosen = (score >= self.tau) & (rank < self._max_merges(k, state))
        if not chosen.any():
            return state
        sizes = torch.gather(state.sizes, 1, members.view(bsz, -1)).view(bsz, n_win, k).float()
        merged = (tokens.float() * sizes[..., None]).sum(2) / sizes.sum(2, keepdim=True).clamp_min(1e-6)
        anchor = members[:, :, 0]  # a merged window lives on in the slot of its top-left patch
        hidden = state.hidden.scatter(
            1,
            anchor[..., None].expand(-1, -1, width),
            torch.where(chosen[..., None], merged.to(tokens.dtype), tokens[:, :, 0]),
        )
        new_sizes = state.sizes.scatter(
            1, anchor, torch.where(chosen, sizes.sum(2), sizes[:, :, 0]).to(state.sizes.dtype)
        )
        gone = torch.zeros_like(state.valid).scatter(
            1, members[:, :, 1:].reshape(bsz, -1), chosen[..., None].expand(-1, -1, k - 1).reshape(bsz, -1)
        )
        index = self._merged_order(state, state.valid & ~gone, anchor, chosen, rank, n_win)
        out = state.replace(hidden=hidden, sizes=new_sizes).keep(index)
        if self.order == "official":  # each visual token's image slot = its rank in the official order
            patch = out.visual & out.valid
            out.positions = torch.where(patch, patch.long().cumsum(-1) - 1, out.positions)
        return out

    def _window_slots(self, state: TokenState) -> Tensor:
        """(B, P) slot of every patch index; the merge runs on the full, unmerged patch grid (a patch that is
        not visual, dropped later by LLaVA-NeXT's unpadding, still has its slot: CLS alone has position -1)."""
        rows, cols = state.grid
        patch = state.valid & (state.positions >= 0)
        if not (patch.sum(-1) == rows * cols).all() or (state.sizes[patch] != 1).any():
            raise RuntimeError("mustdrop: the window merge needs every patch of the grid, unmerged")
        bsz, n = patch.shape
        slots = torch.arange(n, device=patch.device).expand(bsz, n)
        table = torch.zeros(bsz, rows * cols + 1, dtype=torch.long, device=patch.device)
        # Non-patch slots all write to column 0, which is discarded.
        return table.scatter(1, torch.where(patch, state.positions + 1, 0), slots)[:, 1:]

    def _max_merges(self, k: int, state: TokenState) -> int | Tensor:
        """Windows an image may merge: all in threshold mode; in budget mode few enough that at least
        `budget` visual tokens reach the LLM (each merge removes k - 1 tokens); per view, its share of the
        image's budget (`state.quota`, LLaVA-NeXT)."""
        if self.budget is None:
            return self.info.visual_tokens
        if state.quota is not None:
            return ((state.visual_count() - state.quota) // (k - 1))[:, None]
        return (self.info.visual_tokens - self.budget) // (k - 1)

    def _merged_order(self, state, keep, anchor, chosen, rank, n_win) -> Tensor:
        """Keep-index (B, K) in the output order: CLS first, then the patches by `order`."""
        patch = state.visual & state.valid
        n = state.num_tokens
        key = torch.where(patch, 1 + state.positions, 0)  # raster: by patch index (merged: top-left)
        if self.order == "official":
            key = torch.where(patch, 1 + n_win + state.positions, 0)  # unmerged patches after the merged
            key = key.scatter(1, anchor, torch.where(chosen, 1 + rank, key.gather(1, anchor)))
        key = key.masked_fill(~keep, -1)  # dropped slots sort first and become the left padding
        sorted_key, order = key.sort(dim=-1, stable=True)
        width = int(keep.sum(-1).max())
        return order[:, n - width :].masked_fill(sorted_key[:, n - width :] < 0, -1)

    # -- stage 1b: key token set (CLS attention of the layer after the features) -----------------
    def vision_output(self, state: TokenState) -> TokenState:
        probe = state.extras.get("vision_attention")
        if probe is None or self.key_ratio == 0:
            return state
        # The features (CLS first, left-padded) and this state (the same tokens with CLS dropped, or
        # kept as image token 0 under the 'full' strategy) are right-aligned: the CLS sits in the
        # features at this state's first valid slot, and this state's slot j is feature slot j + offset.
        cls_slot = state.num_tokens - state.valid.sum(-1)
        row = probe(cls_slot[:, None], heads="mean")[:, 0]  # (B, feature slots)
        offset = row.shape[-1] - state.num_tokens
        if offset not in (0, 1):
            raise RuntimeError(f"mustdrop: vision features and image tokens are not aligned (offset {offset})")
        candidates = state.visual & state.valid & (state.positions >= 0)  # patches, never CLS
        count = torch.ceil(candidates.sum(-1).double() * self.key_ratio).long()
        if self.budget is not None:
            count = torch.minimum(count, torch.as_tensor(state.row_budget(self.budget), device=count.device))
        return state.replace(protected=top_mask(row[:, offset:], candidates, count))

    # -- stage 2: dual-attention filtering (LLM prefill) -----------------------------------------
    def llm_layer(self, state: TokenState) -> TokenState:
        if state.layer not in self.llm_layers:
            return state
        total, peak = dual_attention(state)
        visual = state.visual & state.valid
        protected = state.protected if state.protected is not None else torch.zeros_like(visual)
        global_sum = (total * visual).sum(-1, keepdim=True)
        if self.budget is None:
            weak = (total < self.global_thr * global_sum) & (peak < self.individual_thr)
            drop = visual & weak & ~protected
            # A cut even when nothing is dropped: the runtime renumbers positions at every pruning
            # layer, as the official code does.
            return state.keep(compact_index(state.valid & ~drop))
        score = torch.maximum(total / (self.global_thr * global_sum).clamp_min(1e-30), peak / self.individual_thr)
        score = score.masked_fill(protected, float("inf"))
        return state.keep(topk_visual(state, score, self._layer_target(state)))

    def _layer_target(self, state: TokenState) -> Tensor:
        """(B,) visual tokens kept after this layer: geometric from the count present down to
        budget x images at the last pruning layer."""
        images = state.num_images
        if images is None:
            images = torch.ones(state.batch_size, dtype=torch.long, device=state.valid.device)
        target = (self.budget * images.to(state.valid.device)).double()
        present = state.visual_count().double()
        left = len(self.llm_layers) - self.llm_layers.index(state.layer)
        ratio = (target / present.clamp_min(1)).clamp(max=1.0)
        keep = torch.round(present * ratio ** (1.0 / left))
        return torch.minimum(torch.maximum(keep, target), present).long()

    # -- stage 3: output-aware cache policy (decode) ---------------------------------------------
    def decode(self, cache) -> None:
        """At the first decoding step, evict from the caches of the pruning layers every entry that
        the last layer does not hold (tokens a later cut dropped)."""
        if cache.step != 0 or not self.output_aware_cache:
            return
        final = cache.slots(cache.num_layers - 1)
        layers = range(self.llm_layers[0], self.llm_layers[-1] + 1)
        width = 1 + max(int(cache.slots(i).origin.max()) for i in [*layers, cache.num_layers - 1])
        survivors = torch.zeros(final.valid.shape[0], width, dtype=torch.long, device=final.valid.device)
        survivors = survivors.scatter_add(1, final.origin.clamp(min=0), final.valid.long()) > 0
        for layer in layers:
            slots = cache.slots(layer)
            keep = slots.valid & survivors.gather(1, slots.origin.clamp(min=0))
            if not torch.equal(keep, slots.valid):
                cache.keep(layer, compact_index(keep))

    def extra_repr(self) -> str:
        return (
            f"budget={self.budget}, window={self.window}, tau={self.tau}, key_ratio={self.key_ratio}, "
            f"global_thr={self.global_thr}, individual_thr={self.individual_thr}, llm_layers={self.llm_layers}, "
            f"order={self.order!r}, output_aware_cache={self.output_aware_cache}"
        )
