"""DyVTE: "Accelerating MLLMs via Dynamic Visual-Token Exit and the Empirical Findings", NeurIPS'25, arXiv
2411.19628 (official code `DoubtedSteam/DyVTE`: `llava/model/language_model/modeling_llama.py`, `init_weight.py`,
`scripts/v1_5/finetune_visual_gate.sh`; read through METHODS.md §5, the paper's full text was not available).

The paper observes that after a few LLM layers the text tokens have taken what they need from the image, and
that the layer where this happens differs from one question to the next. A small router per LLM layer
("hyper-network") looks at the text tokens after each layer and decides, per sample, whether every visual token
can leave. Once a sample's router says "exit" after layer k, layers k+1..L-1 run on that sample's text only, in
the prefill and in every decode step (their KV caches never hold a visual entry). The MLLM stays frozen.

Steps of this file:
  1. Router (§5.1, one per LLM layer, `Router`): input f_k = [mean of layer k's output over the instruction
     tokens after the image, the last excluded ; layer k's output at the last prompt token] in R^{2d}
     (`router_features`); Linear(2d -> hidden, no bias) -> GELU -> Linear(hidden -> 2, no bias); xavier-uniform
     weights. Logit 1 is "exit", logit 0 "keep" (official order).
  2. Inference (§5.2, `DyVTE.llm_layer`): after layer k, for each sample that still holds visual tokens,
     p_exit = softmax(router_k(f_k))[exit]; where p_exit > threshold (0.5: the official argmax) every visual
     token of THAT sample leaves (VTW's withdrawal, per sample); text tokens keep their position ids. Per-sample
     exit layers in one batch work: the runtime keeps a per-sample number of tokens (left padding).
  3. Labels and loss (§5.3, `exit_labels`, `exit_step`): one exit layer k per step for the whole batch; copy A
     runs normally, copy B without visual tokens in layers k+1..L-1 (withdrawn through the runtime, which equals
     the official 4-D mask that hides them from every query there); y = 1 iff the argmax predictions of A and B
     agree on more than 99% of the answer tokens AND the per-sample mean answer cross-entropy CE_B < 1.03 CE_A
     (+ an optional margin in nats, 0 by default: see the deviations);
     loss = CE(router_k(f_k detached), y) with class weights [1, 1]. Only the sampled router learns that step.
     `lightning_modules.dyvte_training` runs this with the recipe's optimiser (lr 6e-5, cosine, 3% warm-up,
     weight decay 0).

Router width: the paper's routers take 2d = 8192 features to 2048 at d = 4096 (16.8M parameters each), a
hidden width of `hidden_ratio` = 2048 / 4096 = 0.5 of the LLM width. A width-4096 hidden layer makes no sense
for a width-128 model, so the hidden width is round(hidden_ratio * d): 2048 on Vicuna-7B, 64 on the tiny shapes
LLaVA (2d * h + 2h = 16,512 parameters per router, 66k for its 4 layers).

Budget: vtprune's budget is the number of visual tokens per image that reach the LLM's last layer. DyVTE has
none to set: each sample keeps all of its visual tokens up to its exit layer and none after it (all of them
if no router fires), so the count is learned per sample, not chosen. `budget` must stay None (any other value
is refused with a message); `threshold` trades accuracy for speed instead (a lower threshold exits earlier).
The efficiency report gives the counts: `visual_tokens` (reaching the last layer) and the per-layer average
`visual_tokens_layer_mean`, which is how DyVTE and the papers it compares with count tokens. The routers' own
multiply-adds (2d h + 2h per sample and layer until the exit) are not in the report's prefill FLOPs: well under
0.1% of one decoder layer's at either size.

Deviations from the official code:
  * The image span and the instruction tokens come from each sample's own visual slots, not the fixed
    offsets 35..610 of batch-1 LLaVA-1.5; any batch (left padding, several images: the instruction tokens are
    those after the last image) works. A prompt with no text between the image and its last token has an
    empty mean, taken as zeros (the official mean would be NaN).
  * The official `Dropout(0.1)` of the router is defined but never applied; it is left out.
  * `threshold` generalises the official argmax (threshold 0.5); 1.0 never exits (the unpruned model).
  * The label's cross-entropy bound takes an optional margin, CE_B < 1.03 CE_A + margin (`exit_labels`,
    `DyVTETraining(label_ce_margin=...)`; 0 by default, the paper's rule). The ratio alone is unreachable for a
    model whose one-word answers have CE_A near 0; the shipped tiny-model routers are trained with 0.05 nats.
  * Routers exist for every layer as in the paper, but the runtime runs hooks after layers 0..L-2 only: an
    exit after the last layer would remove nothing.
  * Training: copy B is a second forward with the visual tokens withdrawn after layer k (through the runtime,
    as VTW at K = k + 1) instead of a duplicated batch sharing layers 0..k; the result is the same (the layers
    up to k agree to float rounding), the cost is k + 1 more layers per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..base import ModelInfo, Stage, TokenState
from ..ops import compact_index
from ..registry import build, register
from ..runtime import attach
from .checkpoint import LearnedPruner

PAPER_WIDTH = 4096  # Vicuna-7B hidden size
PAPER_HIDDEN = 2048  # router hidden width at that size (official visual_gates_router)
HIDDEN_RATIO = PAPER_HIDDEN / PAPER_WIDTH  # 0.5
KEEP, EXIT = 0, 1  # router logit order (official: exit when logits[0] < logits[1])
AGREEMENT = 0.99  # label: argmax agreement of copies A and B on more than this share of answer tokens ...
CE_RATIO = 1.03  # ... and CE_B < CE_RATIO * CE_A (per-sample mean over the answer tokens)


class Router(nn.Module):
    """One layer's exit router: Linear(2d -> hidden, no bias) -> GELU -> Linear(hidden -> 2, no bias)."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * width, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 2, bias=False)
        # Official init_weight.py: xavier-uniform on both weights.
        nn.init.xavier_uniform_(self.fc1.weight, generator=generator)
        nn.init.xavier_uniform_(self.fc2.weight, generator=generator)

    def forward(self, features: Tensor) -> Tensor:
        """(B, 2d) -> (B, 2) logits [keep, exit]."""
        return self.fc2(self.act(self.fc1(features)))


def instruction_mask(valid: Tensor, visual: Tensor, last: Tensor) -> Tensor:
    """(B, N) bool: the text slots after each sample's last visual slot and before its slot `last` (B,).

    These are the instruction tokens the router averages ("\\n" + question + " ASSISTANT" in LLaVA-1.5's
    template); `last` is the last prompt token. Samples without a visual token get every text slot before
    `last`.
    """
    slots = torch.arange(valid.shape[1], device=valid.device)
    last_visual = torch.where(visual & valid, slots, -1).amax(-1)
    return valid & ~visual & (slots > last_visual[:, None]) & (slots < last[:, None])


def router_features(hidden: Tensor, instruction: Tensor, last: Tensor) -> Tensor:
    """(B, 2d) router input: [mean of `hidden` (B, N, d) over `instruction` (B, N) ; hidden at slot `last` (B,)].

    An empty instruction span gives a zero mean. Computed in float32 (the mean of bf16 states loses digits).
    """
    hidden = hidden.float()
    weight = instruction.float()[..., None]
    mean = (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return torch.cat([mean, final], -1)


def exit_labels(logits_a: Tensor, logits_b: Tensor, targets: Tensor, answer: Tensor,
                agreement: float = AGREEMENT, ce_ratio: float = CE_RATIO, ce_margin: float = 0.0) -> Tensor:
    """(B,) long: 1 ("exit is safe") iff copies A (normal) and B (visual tokens withdrawn) agree.

    Args:
        logits_a, logits_b: (B, T, V) next-token logits; position t predicts `targets[:, t]`.
        targets: (B, T) long, the tokens to predict.
        answer: (B, T) bool, the answer positions (at least one per sample).
        agreement, ce_ratio: the label's thresholds (paper: 0.99 and 1.03).
        ce_margin: nats added to the cross-entropy bound (paper: 0, ours; see below).

    y = 1 iff the argmax predictions of A and B are equal on more than `agreement` of the answer positions
    AND the mean answer cross-entropy of B is below `ce_ratio` times that of A plus `ce_margin`.

    Why a margin: the ratio bound is relative, made for a 7B model's multi-token answers. A small model that
    answers one word with near certainty (the tiny shapes LLaVA: median CE_A 0.004 nats) fails it on any change
    in the last digits, even where B gives the same answer with 99% confidence: with the paper's rule only 29%
    of its val samples may exit after decoder layer 1, against 76% with a 0.05-nat margin (the probability of
    the answer may fall by at most 5%), and the argmax agreement is required either way.
    """
    if not bool(answer.any(-1).all()):
        raise ValueError("exit_labels: every sample needs at least one answer position")
    count = answer.sum(-1).float()
    same = (logits_a.argmax(-1) == logits_b.argmax(-1)) & answer
    agree = same.sum(-1).float() / count

    def mean_ce(logits: Tensor) -> Tensor:
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
        return (ce * answer).sum(-1) / count

    return ((agree > agreement) & (mean_ce(logits_b) < ce_ratio * mean_ce(logits_a) + ce_margin)).long()


@register
class DyVTE(LearnedPruner):
    """Per-sample visual-token exit decided by a learned router after each LLM layer (prefill).

    Args:
        budget: must be None: DyVTE is adaptive (see the module docstring); `threshold` sets the trade-off.
        threshold: a sample's visual tokens leave after layer k when its router's p_exit > threshold
            (paper: 0.5, the argmax of the two logits); allowed 0..1, 1 never exits.
        hidden_ratio: router hidden width as a share of the LLM width (paper: 2048 / 4096 = 0.5).
        seed: seed of the routers' initial (xavier-uniform) weights.
        width, layers: the LLM width and depth the routers are built for. None: taken from the model at
            attach (routers are built then). Given (a checkpoint folder records them), the routers are built
            now, so weights can be loaded before attach, and a model of another size is refused at attach.
        checkpoint: a folder written by scripts/publish_checkpoint.py (`pruners.learned.checkpoint`); the
            arguments above that are left at their defaults take its stored values.

    After `setup`: `routers` (one per LLM layer), `width`, `layers`, `hidden`; after each prefill `exit_layers`
    (B,) long, the layer after which each sample's visual tokens left (-1: never).
    """

    name = "dyvte"
    stages = frozenset({Stage.LLM_LAYER})
    adaptive = True  # no budget: each sample's exit layer sets its count

    def __init__(self, budget: int | None = None, threshold: float = 0.5, hidden_ratio: float = HIDDEN_RATIO,
                 seed: int = 0, width: int | None = None, layers: int | None = None,
                 checkpoint: str | None = None) -> None:
        if budget is not None:
            raise ValueError(
                f"dyvte: budget must be None, got {budget!r}: DyVTE is adaptive (each sample keeps all its visual "
                "tokens up to the layer its router picks, none after), so no count can be set; allowed: "
                "budget=None, and threshold in 0..1 (p_exit > threshold exits; lower exits earlier)"
            )
        super().__init__(locals())
        args = self.resolved
        threshold, hidden_ratio, width, layers = args["threshold"], args["hidden_ratio"], args["width"], args["layers"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"dyvte: threshold must be a number in 0..1 (exit when p_exit > threshold), "
                             f"got {threshold!r}")
        if isinstance(hidden_ratio, bool) or not isinstance(hidden_ratio, (int, float)) or not hidden_ratio > 0:
            raise ValueError(f"dyvte: hidden_ratio must be a number > 0 (router hidden width / LLM width; "
                             f"paper {HIDDEN_RATIO}), got {hidden_ratio!r}")
        for what in ("seed", "width", "layers"):
            value, low = args[what], 0 if what == "seed" else 1
            if (value is not None or what == "seed") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"dyvte: {what} must be an int >= {low}{'' if what == 'seed' else ' or None'}, "
                                 f"got {value!r}")
        if (width is None) != (layers is None):
            raise ValueError(f"dyvte: give both width and layers (the routers' model size) or neither, "
                             f"got width={width!r}, layers={layers!r}")
        self.threshold, self.hidden_ratio, self.seed = float(threshold), float(hidden_ratio), args["seed"]
        self.width, self.layers = width, layers
        self.hidden: int | None = None
        self.routers: nn.ModuleList | None = None
        self.exit_layers: Tensor | None = None
        if width is not None:
            self._build(width, layers)
        self.ready()

    def _build(self, width: int, layers: int) -> None:
        self.width, self.layers = width, layers
        self.hidden = max(1, round(self.hidden_ratio * width))
        generator = torch.Generator().manual_seed(self.seed)
        self.routers = nn.ModuleList(Router(width, self.hidden, generator) for _ in range(layers))
        self.routers.train(self.training)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        width, depth = info.llm_width, info.llm_layers
        if width is None:
            raise ValueError(f"dyvte: the {info.family} runtime does not give the LLM width (ModelInfo.llm_width); "
                             "allowed: a family whose runtime sets it")
        if self.routers is None:
            self._build(width, depth)
        elif (self.width, self.layers) != (width, depth):
            raise ValueError(
                f"dyvte: the routers were built for an LLM of width {self.width} and {self.layers} layers; this "
                f"model's LLM has width {width} and {depth} layers; allowed: the model the routers were trained "
                "for, or a fresh dyvte (width=None, layers=None)"
            )
        # Hooks after layers 0..L-2: an exit after the last layer would withdraw nothing.
        self.llm_layers = tuple(range(depth - 1))

    def exit_probability(self, layer: int, features: Tensor) -> Tensor:
        """(B,) p_exit of router `layer` for features (B, 2d), in float32 on the features' device."""
        router = self.routers[layer]
        weight = router.fc1.weight
        logits = router(features.to(weight.device, weight.dtype)).float()
        return logits.softmax(-1)[:, EXIT].to(features.device)

    def llm_layer(self, state: TokenState) -> TokenState:
        if state.layer == self.llm_layers[0]:  # a new prefill: no sample has exited yet
            self.exit_layers = torch.full((state.batch_size,), -1, dtype=torch.long, device=state.hidden.device)
        holding = (state.visual & state.valid).any(-1)  # samples that have not exited (and have an image)
        if not holding.any():
            return state
        last = state.last_index()
        features = router_features(state.hidden, instruction_mask(state.valid, state.visual, last), last)
        leave = holding & (self.exit_probability(state.layer, features) > self.threshold)
        if not leave.any():
            return state
        self.exit_layers = torch.where(leave, state.layer, self.exit_layers)
        # Every visual token of the exiting samples leaves; text keeps its original positions (official).
        return state.keep(compact_index(state.valid & ~(state.visual & leave[:, None])))

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, hidden_ratio={self.hidden_ratio}, seed={self.seed}, "
                f"width={self.width}, layers={self.layers}, hidden={self.hidden}, checkpoint={self.checkpoint}")


# -- training (§5.3) ------------------------------------------------------------------------------------------


def sample_layer(layers: int, seed: int, step: int) -> int:
    """The exit layer k ~ Uniform{0..L-1} of training step `step`: a function of (seed, step) only, so every
    DDP rank trains the same router on a step and a resumed run continues the same sequence."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(layers, (1,), generator=generator))


def answer_positions(attention_mask: Tensor, answer_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """For left-padded prompt + answer rows: ((B, T-1) bool, (B,) long) = the logit positions that predict an
    answer token (position t predicts token t + 1) and each row's last prompt slot (input coordinates)."""
    length = attention_mask.shape[1]
    slots = torch.arange(length - 1, device=attention_mask.device)
    first_target = length - answer_lengths  # the first answer token's slot
    predicts = slots[None, :] >= (first_target - 1)[:, None]
    return predicts, first_target - 1


def exit_step(model, pruner: DyVTE, inputs: dict, answer_lengths: Tensor, layer: int,
              image_token_id: int, ce_ratio: float = CE_RATIO, ce_margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """One DyVTE training step's (router logits (B, 2), labels (B,)) at exit layer `layer`, for a frozen `model`.

    `inputs`: left-padded model inputs of prompt + answer (+ end token), the answer being the last
    `answer_lengths` (B,) tokens of each row. Copy A is the model's own forward; copy B the same with every
    visual token withdrawn after `layer` (none withdrawn at the last layer: B = A). The router input comes from
    copy A's layer-`layer` output, detached. Only the router logits carry a gradient. `ce_ratio`, `ce_margin`:
    the label's cross-entropy bound (`exit_labels`).
    """
    captured = {}
    hook = model.get_decoder().layers[layer].register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.no_grad():
            logits_a = model(**inputs).logits[:, :-1]
    finally:
        hook.remove()
    if layer < pruner.layers - 1:
        with torch.no_grad(), attach(model, build("vtw", k=layer + 1)):
            logits_b = model(**inputs).logits[:, :-1]
    else:
        logits_b = logits_a
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    answer, last = answer_positions(valid, answer_lengths)
    labels = exit_labels(logits_a, logits_b, ids[:, 1:], answer, ce_ratio=ce_ratio, ce_margin=ce_margin)
    instruction = instruction_mask(valid, ids == image_token_id, last)
    features = router_features(captured["hidden"].detach(), instruction, last)
    router = pruner.routers[layer]
    weight = router.fc1.weight
    return router(features.to(weight.device, weight.dtype)), labels.to(weight.device)


def param_count(width: int, layers: int, hidden_ratio: float = HIDDEN_RATIO) -> int:
    """Router parameters for an LLM of `width` and `layers`: L (2d h + 2h), h = round(ratio d)."""
    hidden = max(1, round(hidden_ratio * width))
    return layers * (2 * width * hidden + 2 * hidden)

