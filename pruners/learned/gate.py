"""`gate`: a learned, question-conditioned scorer that keeps the `budget` best visual tokens of each image.

What it is. A lightweight scorer (`Scorer`) reads each visual token and the question and gives it a score; the
`budget` highest-scoring tokens of each image go on, the rest are dropped. By default it acts at VISION_OUTPUT
on the projected features, before the LLM (so the whole LLM sees fewer tokens), conditioned on the mean of the
prompt's LLM input embeddings (its non-image tokens: the question and the chat template around it; the runtime
hands them over as the "question" signal). With `layer=k` it acts after LLM layer k instead, on that layer's
hidden states, conditioned on the mean of the prompt's text states there (an LLM-layer top-k like FastV's,
with a learned score). The ranking does not depend on the budget, so one gate serves every budget; training
samples one budget per step from a list (`lightning_modules.learned_training`).

Attention prior (`attention_prior=True`, LLM layer only; ours, not from a paper): the score gains a term
p * z(log a), a the attention of the prompt's last token to each visual token at that layer (FastV's signal,
head mean) and z its standardisation over the image's tokens, with p a learned scalar (initialised to 1). The
scorer's output layer and question projection then start at zero, so an untrained gate keeps exactly FastV's
tokens and training learns where to depart from them.

Scorer (width d of the LLM, `hidden` h): with x a token and q the question, both layer-normed,
    score(x, q) = w . GELU(W_x x + W_q q + b) + c  +  (K x) . (Q q) / sqrt(h)
an MLP on the token shifted by the question, plus a query-key match of token and question (the question says
which object matters, the match finds its tokens), plus the attention prior when asked. 4dh + 4d + 2h + 1
parameters (+ 1 with the prior): 33,409 on the tiny shapes
LLaVA (d = 128, h = 64), 1.07M on a 7B LLM (d = 4096; `hidden=16` gives 0.27M). Weights are initialised from
`seed` (xavier-uniform, zero biases), so two fresh gates are equal and every DDP rank starts the same.

Training: a straight-through top-k (module function `straight_through_topk`). The forward pass keeps exactly
`budget` tokens, as at inference: dropped tokens leave the sequence (the same as masking them out of every
attention), kept ones are multiplied by a gate value that is exactly 1. Backward, that 1 carries the gradient
of a sigmoid relaxation of the keep decision, sigmoid((z - t) / temperature), where z are the scores
standardised over the image's tokens and t lies halfway between the k-th and (k+1)-th of them. So a kept token
whose presence lowers the answer loss (the first-order effect of scaling it, which is the effect of dropping
it to first order) has its score raised, and through the standardisation every other score moves the
opposite way. Dropped tokens get no direct gradient; Gumbel noise on the raw scores (`noise`, training only)
samples the kept set without replacement in proportion to exp(score) (the Gumbel-top-k trick), so every token
is now and then kept and scored, and the scorer's own scale sets how much it explores. The MLLM itself stays
frozen (LoRA on the LLM optional, in the trainer).

Papers the relaxation follows:
  * straight-through estimator: Bengio, Leonard & Courville, "Estimating or Propagating Gradients Through
    Stochastic Neurons for Conditional Computation", arXiv 1308.3432 (2013); with a sigmoid/softmax backward as in
    Jang, Gu & Poole, "Categorical Reparameterization with Gumbel-Softmax", ICLR 2017 (arXiv 1611.01144);
  * Gumbel-top-k sampling: Kool, van Hoof & Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k
    Trick for Sampling Sequences Without Replacement", ICML 2019 (arXiv 1903.06059);
  * a learned token-keep predictor trained end to end through the frozen network's loss, top-k at inference:
    DynamicViT, Rao et al., NeurIPS 2021 (arXiv 2106.02034), conditioned there on the image's global feature,
    here on the question. DynamicViT keeps every token during training and masks attention with the relaxed
    decisions; here the dropped tokens really leave, so the model keeps SDPA and a training forward equals the
    inference forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..base import ModelInfo, Stage, TokenState
from ..ops import compact_index, top_mask, topk_visual
from ..registry import register
from .checkpoint import LearnedPruner


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B, D) float32 mean of `values` (B, N, D) over the slots where `mask` (B, N) holds (zeros if none)."""
    weight = mask.float()[..., None]
    return (values.float() * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def standardize(scores: Tensor, candidates: Tensor) -> Tensor:
    """Scores shifted and scaled to mean 0, std 1 over each row's candidates (ranking unchanged): the relaxation's
    temperature then means the same whatever scale the scorer drifts to."""
    weight = candidates.float()
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (scores * weight).sum(-1, keepdim=True) / count
    var = ((scores - mean) ** 2 * weight).sum(-1, keepdim=True) / count
    return (scores - mean) / (var + 1e-6).sqrt()


def topk_threshold(scores: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """(B,) halfway between the k-th and the (k+1)-th best candidate score of each row (one below the k-th when
    every candidate is kept)."""
    ranked = scores.detach().masked_fill(~candidates, float("-inf")).sort(-1, descending=True).values
    count = candidates.sum(-1)
    kept = torch.minimum(k, count).clamp_min(1)
    upper = ranked.gather(1, (kept - 1)[:, None])[:, 0]
    lower = ranked.gather(1, kept.clamp(max=scores.shape[1] - 1)[:, None])[:, 0]
    return torch.where(kept < count, (upper + lower) / 2, upper - 1.0)


def straight_through_topk(scores: Tensor, candidates: Tensor, k: int | Tensor, temperature: float) -> Tensor:
    """(B, N) keep mask: forward exactly 1 on the `k` best candidates of each row and 0 elsewhere (ties to the
    earlier slot, as `pruners.ops.top_mask`); backward the gradient of sigmoid((scores - t) / temperature), t
    the row's `topk_threshold` (held fixed), on the candidates."""
    k = torch.as_tensor(k, device=scores.device).expand(scores.shape[0])
    hard = top_mask(scores, candidates, k).to(scores.dtype)
    soft = torch.sigmoid((scores - topk_threshold(scores, candidates, k)[:, None]) / temperature)
    # hard + (soft - soft) is exactly hard in the forward pass; the bracket carries the gradient.
    return hard + (soft - soft.detach()) * candidates


def check_int(what: str, value, low: int, optional: bool) -> None:
    """ValueError unless `value` is an int >= low (or None when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"gate: {what} must be an int >= {low}{' or None' if optional else ''}, got {value!r}")


def gumbel_like(x: Tensor) -> Tensor:
    """Standard Gumbel noise of x's shape (from the global RNG, which the trainer seeds)."""
    uniform = torch.rand_like(x).clamp(1e-9, 1 - 1e-9)
    return -(-uniform.log()).log()


class Scorer(nn.Module):
    """score(x, q) = w . GELU(W_x x + W_q q + b) + c + (K x) . (Q q) / sqrt(h) [+ p prior], x and q layer-normed.

    With `prior`, w and Q start at zero and p at 1, so the first scores are the prior alone."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator, prior: bool = False) -> None:
        super().__init__()
        self.token_norm, self.question_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token = nn.Linear(dim, hidden)
        self.question = nn.Linear(dim, hidden, bias=False)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.query = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        for layer in (self.token, self.question, self.key, self.query, self.out):
            nn.init.xavier_uniform_(layer.weight, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.scale = hidden**-0.5
        self.prior_weight = nn.Parameter(torch.ones(())) if prior else None
        if prior:  # both learned terms start at 0; w and Q still get gradients (from GELU(W_x x + b) and K x)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.query.weight)

    def forward(self, tokens: Tensor, question: Tensor, prior: Tensor | None = None) -> Tensor:
        """(R, N) float32 scores of tokens (R, N, d) given one question vector (R, d) per row (and the (R, N)
        prior, when the scorer has one)."""
        x = self.token_norm(tokens.to(self.token.weight.dtype))
        q = self.question_norm(question.to(self.token.weight.dtype))
        mlp = self.out(F.gelu(self.token(x) + self.question(q)[:, None]))[..., 0]
        match = (self.key(x) * self.query(q)[:, None]).sum(-1) * self.scale
        score = (mlp + match).float()
        if self.prior_weight is not None:
            score = score + self.prior_weight.float() * prior
        return score


@register
class GatePruner(LearnedPruner):
    """Keep the `budget` visual tokens per image a learned, question-conditioned scorer ranks highest.

    Args:
        budget: visual tokens kept per image (any budget; the training budgets are in the checkpoint's record).
            None: a quarter of the image's tokens (144 of 576), as `random` and `pool`; a checkpoint stores the
            first budget it was trained for.
        layer: None (default): act at VISION_OUTPUT on the projected features. k: act after LLM layer k (0..L-2)
            on its hidden states (the budget per image then counts from layer k + 1 on).
        attention_prior: add the learned-weight attention prior of the module docstring (needs `layer`).
        hidden: the scorer's hidden width h (4dh + 4d + 2h + 1 parameters).
        temperature: of the sigmoid relaxation in training (scores are standardised per image).
        noise: scale of the Gumbel noise added to the raw scores in training (1: exact Gumbel-top-k sampling;
            0: none).
        seed: seed of the initial weights.
        dim: the LLM width the scorer is built for. None: taken from the model at attach; a checkpoint records it.
        checkpoint: a folder written by scripts/publish_checkpoint.py (`pruners.learned.checkpoint`).

    Inference (eval mode, or no gradient) is a plain top-k of the scores; in training mode with gradients on, the
    straight-through top-k of the module docstring, with noise.
    """

    name = "gate"
    stages = frozenset({Stage.VISION_OUTPUT, Stage.LLM_LAYER})
    needs = frozenset({"question"})

    def __init__(self, budget: int | None = None, layer: int | None = None, hidden: int = 64,
                 temperature: float = 0.5, noise: float = 1.0, seed: int = 0, attention_prior: bool = False,
                 dim: int | None = None, checkpoint: str | None = None) -> None:
        super().__init__(locals())
        args = self.resolved
        for what, low, optional in (("hidden", 1, False), ("seed", 0, False), ("dim", 1, True), ("layer", 0, True)):
            check_int(what, args[what], low, optional)
        for what, low, strict in (("temperature", 0, True), ("noise", 0, False)):
            value = args[what]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low or strict and value == low:
                raise ValueError(f"gate: {what} must be a number {'>' if strict else '>='} {low}, got {value!r}")
        if not isinstance(args["attention_prior"], bool):
            raise ValueError(f"gate: attention_prior must be True or False, got {args['attention_prior']!r}")
        if args["attention_prior"] and args["layer"] is None:
            raise ValueError("gate: attention_prior reads the LLM's attention, so it needs an LLM layer: give "
                             "layer=k (0..L-2), or attention_prior=False at VISION_OUTPUT")
        self.layer, self.hidden, self.seed = args["layer"], args["hidden"], args["seed"]
        self.attention_prior = args["attention_prior"]
        self.temperature, self.noise = float(args["temperature"]), float(args["noise"])
        self.dim: int | None = None
        self.scorer: Scorer | None = None
        if args["dim"] is not None:
            self._build(args["dim"])
        self.ready()

    def _build(self, dim: int) -> None:
        self.dim = dim
        self.scorer = Scorer(dim, self.hidden, torch.Generator().manual_seed(self.seed), self.attention_prior)
        self.scorer.train(self.training)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.budget is None:
            self.budget = max(1, info.visual_tokens // 4)
        if info.llm_width is None:
            raise ValueError(f"gate: the {info.family} runtime does not give the LLM width (ModelInfo.llm_width)")
        if self.scorer is None:
            self._build(info.llm_width)
        elif self.dim != info.llm_width:
            raise ValueError(f"gate: the scorer was built for an LLM of width {self.dim}; this model's LLM has width "
                             f"{info.llm_width}; allowed: the model it was trained for, or a fresh gate (dim=None)")
        if self.layer is not None and not 0 <= self.layer <= info.llm_layers - 2:
            raise ValueError(f"gate: layer {self.layer} is out of range for a {info.llm_layers}-layer LLM: allowed "
                             f"0..{info.llm_layers - 2} (a cut after the last layer would change nothing)")
        self.llm_layers = () if self.layer is None else (self.layer,)

    def scores(self, state: TokenState) -> Tensor:
        """(B, N) float32 score of every slot (read on visual slots only)."""
        if state.stage == Stage.VISION_OUTPUT:
            if "text_embeds" not in state.extras:
                raise ValueError("gate: this runtime gives no question at VISION_OUTPUT (signal 'question')")
            text = masked_mean(state.extras["text_embeds"], state.extras["text_valid"])
            question = text[state.extras["text_row"]]
        else:  # LLM layer: the prompt's text states at this layer
            question = masked_mean(state.hidden, state.valid & ~state.visual)
        return self.scorer(state.hidden, question, self.prior(state) if self.attention_prior else None)

    def prior(self, state: TokenState) -> Tensor:
        """(B, N) standardised log attention of the last prompt token to each slot (FastV's score)."""
        attention = state.attention(state.last_index()[:, None])[:, 0]
        return standardize(attention.clamp_min(1e-12).log(), state.visual & state.valid)

    def vision_output(self, state: TokenState) -> TokenState:
        if self.layer is not None:
            return state
        return self.select(state, self.scores(state), state.row_budget(self.budget))

    def llm_layer(self, state: TokenState) -> TokenState:
        images = state.num_images
        if images is None:
            images = torch.ones(state.batch_size, dtype=torch.long, device=state.hidden.device)
        return self.select(state, self.scores(state), self.budget * images.to(state.hidden.device))

    def select(self, state: TokenState, scores: Tensor, k: int | Tensor) -> TokenState:
        """Keep the text and the `k` best visual tokens; in training, through the straight-through top-k."""
        if not (self.training and torch.is_grad_enabled()):
            return state.keep(topk_visual(state, scores, k))
        candidates = state.visual & state.valid
        if self.noise > 0:  # Gumbel-top-k: the kept set is a draw from the scores' own (Plackett-Luce) policy
            scores = scores + self.noise * gumbel_like(scores)
        mask = straight_through_topk(standardize(scores, candidates), candidates, k, self.temperature)
        keep = (state.valid & ~state.visual) | (candidates & (mask > 0.5))
        gain = torch.where(candidates, mask, torch.ones_like(mask))  # exactly 1 on what stays
        return state.replace(hidden=state.hidden * gain[..., None].to(state.hidden.dtype)).keep(compact_index(keep))

    def extra_repr(self) -> str:
        where = "vision_output" if self.layer is None else f"llm_layer={self.layer}"
        prior = ", attention_prior" if self.attention_prior else ""
        return f"budget={self.budget}, {where}{prior}, hidden={self.hidden}, dim={self.dim}"


def parameter_count(dim: int, hidden: int, attention_prior: bool = False) -> int:
    """Parameters of a gate on an LLM of width `dim`: 4dh + 4d + 2h + 1 (+ 1 with the attention prior)."""
    return 4 * dim * hidden + 4 * dim + 2 * hidden + 1 + int(attention_prior)

