"""VTW: Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid
Inference", AAAI 2025, arXiv 2405.05803 (official code `lzhxmu/VTW`: `llava/model/language_model/VTW.py`
and the K search in `lmms-evaluation/lmms_eval/__main__.py`; read through METHODS.md §6 "VTW", the
paper's full text was not available).

The paper observes that deep LLM layers attend to visual tokens very little (the attention sink
falls on the first tokens and the nearest ones) and that the image's information has migrated into
the text tokens after the first layers. So every visual token is withdrawn at one layer K: layers
0..K-1 see the whole sequence, layers K..L-1 see the text only. No token is scored, no attention is
needed, and the model keeps SDPA / FlashAttention. Steps of this file:
  1. Withdrawal (paper Fig. 2; METHODS §6): right before LLM layer K every visual token leaves the
     sequence, so layer K is the first without any. Implemented as an LLM_LAYER hook after layer
     K - 1 that keeps the text tokens of every sample. The caches of layers >= K therefore hold no
     visual entry (METHODS §7.2), and decoding never sees the image again past layer K - 1.
  2. Positions (official `pe_type="keep"`, the default): text tokens keep their original position
     ids, so the answer starts at the same position as in the unpruned model.
  3. K (official `temp_cache.k = 15`, README `--k=15`, for the 32-layer Vicuna-7B): `k=None` maps
     15 of 32 to a shallower or deeper decoder with `pruners.base.scale_layers` (relative depth),
     clipped to 1..L-1 (2 on a 4-layer decoder). An explicit `k` is in this model's own layers.
  4. Choosing K (paper: "determine K by the KL divergence on a small subset"; official `--findk`):
     for every K from 5 (scaled like K) to L-1 run the prefill with withdrawal at K on about 20
     samples, take D_K = KL(p_withdrawn || p_full) of the next-token distributions at the last
     prompt token, averaged over the samples (`withdrawal_kl`), and pick the first K with
     D_K <= eta (`choose_k`); eta = 0.003 for LLaVA-1.5-7B (0.0005 for 13B, 0.0001 for
     LLaVA-1.6-7B). `search_layers` gives the candidates. `scripts/vtw_find_k.py` runs the search
     on a local model and writes a pruner YAML with the K it found.

Budget (vtprune's contract counts visual tokens at the LLM's last layer, which is 0 for VTW at any
K < L): here `budget` is the LAYER-AVERAGE number of visual tokens per image, the count under which
papers put VTW beside SparseVLM or PDrop. With N visual tokens per image and L layers, withdrawal at
K gives an average of K N / L, so a budget chooses K = floor(budget L / N + 1/2) (the nearest
layer, halves up), clipped to 1..L. K = L means no withdrawal (every layer keeps all N tokens). A
budget below N / (2L) would round to K = 0 (the image never seen), so it is raised to K = 1, the
fewest visual tokens VTW keeps, with a warning: on the 4-layer demo model (N = 576) budget 64 gives
K = 1, 144 tokens on average. On LLaVA-1.5-7B (N = 576, L = 32, 18 tokens per layer) budgets
64 / 128 / 192 give K = 4 / 7 / 11, a layer average of 72 / 126 / 198 tokens: the nearest VTW can
reach, not the budget exactly (the report's `visual_tokens_layer_mean` gives the count). `k` and
`budget` are exclusive; with neither, K is the paper's 15 (scaled).

Deviations from the official code:
  * The image span comes from the runtime's image slots of each sample, not fixed offsets 35..610;
    any batch size (left padding) and several images per sample work (official: batch 1, one image).
  * Positions: only the official default ("keep") is offered. The official alternative renumbers
    the text contiguously at layers >= K while layers < K keep the original ids during decoding;
    the runtime's `renumber_positions` shifts every layer alike, so it cannot reproduce that.
  * K search: the official run recomputes the whole prefill for each K as here, but in the model
    dtype with the official mask left at full length after the cut; here each K is a normal pruned
    prefill through the runtime and the KL is computed in float32. Candidates start at 5 (scaled);
    when no K meets eta the official code fails (an empty index), `choose_k` returns None.
  * The official argparse default of `--k` is 16 while `temp_cache.k` and the README use 15; 15 is
    taken.
"""

from __future__ import annotations

import math
import warnings

from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import compact_index
from ..registry import register

PAPER_LLM_DEPTH = 32  # Vicuna-7B
PAPER_K = 15  # official temp_cache.k / README --k=15
PAPER_SEARCH_START = 5  # official --findk tries K = 5..31
PAPER_ETA = 0.003  # LLaVA-1.5-7B (official: 0.0005 for 13B, 0.0001 for LLaVA-1.6-Vicuna-7B)


def default_k(llm_layers: int) -> int:
    """The paper's K = 15 of 32 on an `llm_layers`-deep decoder, clipped to 1..L-1."""
    return min(llm_layers - 1, max(1, scale_layers((PAPER_K,), PAPER_LLM_DEPTH, llm_layers)[0]))


def k_for_budget(budget: int, visual_tokens: int, llm_layers: int) -> int:
    """K whose layer-average visual count K N / L is nearest `budget` (halves up), at most L; may be 0."""
    return min(llm_layers, math.floor(budget * llm_layers / visual_tokens + 0.5))


def layer_mean(k: int, visual_tokens: int, llm_layers: int) -> float:
    """Visual tokens per image averaged over the L layers when withdrawing at K."""
    return k * visual_tokens / llm_layers


def search_layers(llm_layers: int, start: int | None = None) -> tuple[int, ...]:
    """Candidate K of the search, ascending: `start` (default: the paper's 5 of 32, scaled) to L-1."""
    if start is None:
        start = max(1, scale_layers((PAPER_SEARCH_START,), PAPER_LLM_DEPTH, llm_layers)[0])
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= llm_layers - 1:
        raise ValueError(f"vtw: search start {start!r} is out of range: allowed 1..{llm_layers - 1}")
    return tuple(range(start, llm_layers))


def withdrawal_kl(full_logits: Tensor, withdrawn_logits: Tensor) -> Tensor:
    """(B,) KL(p_withdrawn || p_full) of next-token distributions given as (B, V) logits, in float32.

    The official `KLDivLoss(log_softmax(full), softmax(withdrawn))` per sample (batch of 1, batchmean).
    """
    log_full = full_logits.float().log_softmax(-1)
    log_withdrawn = withdrawn_logits.float().log_softmax(-1)
    return (log_withdrawn.exp() * (log_withdrawn - log_full)).sum(-1)


def choose_k(kl_by_k: dict[int, float], eta: float = PAPER_ETA) -> int | None:
    """The first (smallest) K whose mean KL is at most `eta`; None when none is.

    Official: `(kl <= eta).nonzero()[0]` over K = 5..31 in order, i.e. the first layer under the
    threshold, not the last layer above it (a later K above eta does not matter).
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"vtw: eta must be a number >= 0, got {eta!r}")
    return next((k for k in sorted(kl_by_k) if kl_by_k[k] <= eta), None)


@register
class VTW(Pruner):
    """Withdraw every visual token right before LLM layer k (prefill); layers >= k see only text.

    Args:
        budget: layer-average visual tokens per image (see the module docstring): chooses
            k = floor(budget * L / N + 1/2) clipped to 1..L, the nearest reachable average.
            Exclusive with `k`.
        k: first LLM layer without visual tokens, in this model's layers: 1..L (L: no withdrawal).
            None with no budget: the paper's K = 15 of 32 layers, scaled to this decoder.

    After `setup`, `k` is the layer used and `layer_mean` the layer-average visual count per image.
    """

    name = "vtw"
    stages = frozenset({Stage.LLM_LAYER})

    def __init__(self, budget: int | None = None, k: int | None = None) -> None:
        super().__init__(budget)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"vtw: k must be an int >= 1 (first LLM layer without visual tokens) or None, got {k!r}")
        if k is not None and budget is not None:
            raise ValueError(f"vtw: give budget ({budget}) or k ({k}), not both: a budget chooses k")
        self._k_arg = k
        self.k = k
        self.layer_mean: float | None = None

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        n, depth = info.visual_tokens, info.llm_layers
        if self.budget is not None:
            k = k_for_budget(self.budget, n, depth)
            if k < 1:
                k = 1
                warnings.warn(
                    f"vtw: budget {self.budget} is below half the smallest layer-average VTW reaches on this model; "
                    f"using k=1 of {depth} layers ({layer_mean(1, n, depth):g} visual tokens per layer on average)",
                    stacklevel=2,
                )
        elif self._k_arg is not None:
            k = self._k_arg
            if k > depth:
                raise ValueError(
                    f"vtw: k={k} is out of range for a {depth}-layer decoder: allowed 1..{depth} "
                    f"({depth}: no withdrawal)"
                )
        else:
            if depth < 2:
                raise ValueError(f"vtw: the decoder has {depth} layer(s); allowed: at least 2 (or give k={depth})")
            k = default_k(depth)
        self.k = k
        self.layer_mean = layer_mean(k, n, depth)
        # The hook runs after layer k - 1; k = L withdraws nothing and needs no hook.
        self.llm_layers = (k - 1,) if k < depth else ()
        self.check_layers(self.llm_layers, depth, "llm_layers")

    def llm_layer(self, state: TokenState) -> TokenState:
        if state.layer != self.k - 1 or not (state.visual & state.valid).any():
            return state
        # Text tokens only, in order, with their original position ids (official pe_type="keep").
        return state.keep(compact_index(state.valid & ~state.visual))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, k={self.k}, layer_mean={self.layer_mean}"
