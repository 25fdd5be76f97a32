"""PyramidDrop (PDrop): Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu, Lin, "PyramidDrop: Accelerating
Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247);
official code `Cooperx521/PyramidDrop` (`llava/model/modeling_llama_pdrop.py`: `pdrop_forward`,
`pdrop_rank_drop`; `scripts/v1_5/pdrop_eval/*.sh`). LightCompress / llmc `pyramiddrop.py` is a faithful port.

The paper's full text could not be read (METHODS.md §8); the steps follow its abstract and Fig. 2 ("divide the
forward pass of the LLM into stages and drop part of the image tokens at the end of each stage with a pre-defined
ratio ... based on a lightweight attention calculation"), its Sec. 3.2, as summarised in METHODS.md §6, and the
official code. Steps of this file:

  1. Stages (Sec. 3.2; `layer_list`): the decoder is cut into stages by `layer_list` = (8, 16, 24) of Vicuna's 32
     layers, given as the first layer of each new stage (0-based): layers 0..7 see every image token, layers 8..15
     the first kept set, and so on (official: rank & drop runs when `layer_idx + 1` is in the list).
  2. Filter, score (Sec. 3.2, "lightweight attention"; `scores`): at the end of a stage, the attention row of the
     LAST INSTRUCTION token (at inference the last token of the prompt, i.e. the last prefill token; official
     `prompt_len + image_tokens - 1`): softmax over all keys with the causal (and padding) mask, mean over heads,
     read on the image columns. One query row, taken from the runtime's attention probe, so the model keeps SDPA.
  3. Filter, choose (`llm_layer`): keep the top count of the image tokens, in their original order (official:
     `topk` then `sort`); text tokens always stay. Paper schedule: count_s = floor(N * lambda^s) with lambda = 0.5,
     i.e. `image_token_ratio_list` (0.5, 0.25, 0.125): 576 -> 288 -> 144 -> 72 (floor, as the official `int()`).
  4. Positions are renumbered contiguously after each cut (`renumber_positions = True`, official: position ids
     0..L'-1 after every drop; during decoding the runtime shifts new positions by the tokens dropped, as the
     official code subtracts each stage's drop).

Which layer scores (`scoring_layer`). The official code scores with the NEXT stage's first layer l: it applies
layer l's input RMSNorm, q_proj and k_proj (+ RoPE) to the output of layer l - 1 and then runs layer l on the kept
tokens.
  * "official" (default): exactly that. The hook runs before layer l (`llm_hook_point = "pre"`): the runtime
    applies layer l's norm and q/k projections to the incoming tokens for the probe (one extra projection, as
    the official code), and the whole of layer l sees the kept tokens.
  * "stage_end": the hook runs after layer l - 1 and scores with that layer's own attention (the last layer
    of the finished stage); the cut, counts, FLOPs and KV cache are the same, the score one layer earlier.

Budget (DESIGN.md: visual tokens per image reaching the LLM's LAST layer).
  * `budget=None`: the paper's fixed lambda schedule (`image_token_ratio_list` or `lam`); `budget` then holds the
    count it leaves at the last layer (72 of 576 for lambda = 0.5). Papers quote PDrop's "192 / 128 / 64" as the
    mean over the 32 layers of the visual tokens (lambda = 0.5 gives (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32
    = 270); the report holds that figure as `visual_tokens_layer_mean`.
  * `budget=T` (ours, not the paper's): the pyramid keeps its shape with a geometric ratio from N down to T over
    the S stages, count_s = round(N * (T / N) ** (s / S)), the last one exactly T. T = 64 on 576 gives
    277 -> 133 -> 64; T = N keeps everything (no cut, the unpruned model).

Layer schedules are given for Vicuna-7B (32 layers) and mapped to other depths with `pruners.base.scale_layers`,
then clipped to first shorter layers 1..L-1; stages that land on the same layer merge and keep the deepest stage's
count: (8, 16, 24) become first-shorter layers 1, 2, 3 on a 4-layer decoder (hooks before 1, 2, 3 for "official",
after 0, 1, 2 for "stage_end").

Deviations from the official code:
  * `scoring_layer="stage_end"` (not the default) scores one layer earlier than the official code.
  * The official code loops over a right-padded batch with one image per sample and fixed counts int(N * ratio);
    here the image span and the last token are found per sample in a left-padded batch (vectorised), and a
    sample with several images keeps count x images of its visual tokens, chosen jointly. Text-only samples are
    untouched (as official).
  * Scores stay float32 (official casts the softmax to the model's half precision before the head mean); ties go
    to the earlier token (official `topk` leaves tie order unspecified).
  * The "last instruction token" is the last prefill token; the official training path (the token before each
    answer, from the labels) has no counterpart at inference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import ModelInfo, Pruner, Stage, TokenState, scale_layers
from ..ops import topk_visual
from ..registry import register

PAPER_LLM_DEPTH = 32  # Vicuna-7B, for which layer_list is given
PAPER_LAYERS = (8, 16, 24)  # first layer of each new stage (official scripts: --layer_list '[8,16,24]')
PAPER_LAMBDA = 0.5  # ratios 0.5, 0.25, 0.125 (official scripts: --image_token_ratio_list "[1.0,0.5,0.25,0.125]")
SCORING_LAYERS = ("official", "stage_end")


def paper_counts(visual_tokens: int, ratios: tuple[float, ...]) -> tuple[int, ...]:
    """Tokens per image kept by each stage under the fixed schedule: floor(N * ratio), as the official `int()`."""
    return tuple(math.floor(visual_tokens * r) for r in ratios)


def geometric_counts(visual_tokens: int, budget: int, stages: int) -> tuple[int, ...]:
    """Tokens per image kept by each of `stages` stages: round(N * (T / N) ** (s / S)), ending exactly at T.

    Rounding is monotone, so the counts never increase and never fall below T.
    """
    ratio = budget / visual_tokens
    counts = [round(visual_tokens * ratio ** (s / stages)) for s in range(1, stages)]
    return (*counts, budget)


def _check_layers(layers) -> tuple[int, ...]:
    ok = isinstance(layers, (list, tuple)) and len(layers) > 0
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x < PAPER_LLM_DEPTH for x in layers)
    ok = ok and all(a < b for a, b in zip(layers, layers[1:]))
    if not ok:
        raise ValueError(
            f"pdrop: layer_list must be a non-empty, strictly increasing list of ints in 1..{PAPER_LLM_DEPTH - 1} "
            f"(the first layer of each new stage, for a {PAPER_LLM_DEPTH}-layer decoder), got {layers!r}"
        )
    return tuple(layers)


def _check_ratios(ratios, stages: int) -> tuple[float, ...]:
    if isinstance(ratios, (list, tuple)) and len(ratios) == stages + 1 and ratios[0] == 1.0:
        ratios = ratios[1:]  # the official scripts' form, with the leading 1.0 of the first stage
    ok = isinstance(ratios, (list, tuple)) and len(ratios) == stages
    ok = ok and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios)
    ok = ok and all(a >= b for a, b in zip(ratios, ratios[1:]))
    if not ok:
        raise ValueError(
            f"pdrop: image_token_ratio_list must hold {stages} non-increasing numbers in (0, 1], one per entry of "
            f"layer_list (a leading 1.0, as in the official scripts, is allowed), got {ratios!r}"
        )
    return tuple(float(r) for r in ratios)


@register
class PDrop(Pruner):
    """Drop image tokens in a pyramid: at the end of each LLM stage keep those the last instruction token attends
    to most (prefill).

    Args:
        budget: visual tokens per image at the LLM's last layer (ours: geometric pyramid from N down to it).
            None: the paper's fixed schedule (`image_token_ratio_list` / `lam`).
        layer_list: first layer of each new stage, for a 32-layer decoder (official (8, 16, 24); scaled to the
            model's depth in `setup`).
        image_token_ratio_list: fraction of the N image tokens kept by each stage (budget=None only). None:
            lam ** 1, lam ** 2, ... (the paper's (0.5, 0.25, 0.125)).
        lam: the paper's lambda, in (0, 1) (default 0.5); give it or `image_token_ratio_list`, not both.
        scoring_layer: "official" (default) or "stage_end"; see the module docstring.
    """

    name = "pdrop"
    stages = frozenset({Stage.LLM_LAYER})
    renumber_positions = True

    def __init__(
        self,
        budget: int | None = None,
        layer_list: tuple[int, ...] = PAPER_LAYERS,
        image_token_ratio_list: tuple[float, ...] | None = None,
        lam: float | None = None,
        scoring_layer: str = "official",
    ) -> None:
        super().__init__(budget)
        self.layer_list = _check_layers(layer_list)
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 1):
            raise ValueError(f"pdrop: lam (the paper's lambda) must be a number in (0, 1), got {lam!r}")
        if lam is not None and image_token_ratio_list is not None:
            raise ValueError("pdrop: give lam or image_token_ratio_list, not both; allowed: one of them (or neither)")
        if budget is not None and (lam is not None or image_token_ratio_list is not None):
            raise ValueError(
                f"pdrop: budget {budget} sets its own geometric schedule; lam / image_token_ratio_list are allowed "
                "only with budget=None (the paper's fixed schedule)"
            )
        if image_token_ratio_list is None:
            base = PAPER_LAMBDA if lam is None else float(lam)
            image_token_ratio_list = tuple(base**s for s in range(1, len(self.layer_list) + 1))
        self.ratios = _check_ratios(image_token_ratio_list, len(self.layer_list))
        if scoring_layer not in SCORING_LAYERS:
            raise ValueError(f"pdrop: scoring_layer must be one of {SCORING_LAYERS}, got {scoring_layer!r}")
        self.scoring_layer = scoring_layer
        # "official" scores with the cut layer's own norm and q/k on the incoming tokens: a hook before it.
        self.llm_hook_point = "pre" if scoring_layer == "official" else "block"
        self.stage_counts: tuple[int, ...] = ()
        self._count_at: dict[int, int] = {}

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.llm_layers < 2:
            raise ValueError(f"pdrop: the decoder has {info.llm_layers} layer(s); allowed: at least 2")
        hooks = self._hook_layers(info.llm_layers)
        if self.budget is None:
            counts = paper_counts(info.visual_tokens, self.ratios)
            if counts[-1] < 1:
                raise ValueError(
                    f"pdrop: ratio {self.ratios[-1]} keeps no image token of {info.visual_tokens}; "
                    f"allowed ratios >= {1 / info.visual_tokens:.6f}"
                )
            # Stages merged onto one layer keep the deepest stage's count (dict keeps the last value).
            self._count_at = dict(zip(hooks, counts))
            self.budget = counts[-1]
        else:
            layers = tuple(dict.fromkeys(hooks))
            self._count_at = dict(zip(layers, geometric_counts(info.visual_tokens, self.budget, len(layers))))
        self.llm_layers = tuple(self._count_at)
        self.stage_counts = tuple(self._count_at.values())

    def _hook_layers(self, depth: int) -> tuple[int, ...]:
        """Hook layer of each stage on a `depth`-layer decoder (one per entry of layer_list, repeats allowed)."""
        first = [scale_layers((layer,), PAPER_LLM_DEPTH, depth)[0] for layer in self.layer_list]
        first = [min(max(layer, 1), depth - 1) for layer in first]  # the first shorter layer: 1..depth-1
        if self.scoring_layer == "official":  # hook before it
            return tuple(first)
        return tuple(layer - 1 for layer in first)  # hook after the layer before it

    def scores(self, state: TokenState) -> Tensor:
        """(B, N) head-mean softmax attention of each sample's last token (the last instruction token) to every
        slot; only the image columns are read."""
        return state.attention(state.last_index()[:, None], heads="mean")[:, 0]

    def llm_layer(self, state: TokenState) -> TokenState:
        count = self._count_at.get(state.layer)
        if count is None:
            return state
        images = state.num_images
        if images is None:  # no count given: assume one image per sample
            images = torch.ones(state.batch_size, dtype=torch.long, device=state.hidden.device)
        target = count * images.to(state.hidden.device)
        if bool((target >= state.visual_count()).all()):
            return state  # nothing to drop (keep-everything budget): no cut, the unpruned model
        return state.keep(topk_visual(state, self.scores(state), target))

    def extra_repr(self) -> str:
        schedule = f"ratios={self.ratios}" if self._budget_arg is None else "schedule='geometric'"
        return (
            f"budget={self.budget}, layer_list={self.layer_list}, {schedule}, scoring_layer={self.scoring_layer!r}, "
            f"llm_layers={self.llm_layers}, stage_counts={self.stage_counts}"
        )
