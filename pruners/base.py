"""The contract every pruner implements: `Stage`, `TokenState`, `ModelInfo` and `Pruner`.

A pruner knows no model family. The runtime (``pruners/runtime``) hands it a `TokenState` at
each stage it declared and takes a `TokenState` back. Tokens are kept in a padded batch: each
sample has its own number of valid slots (``valid``), so pruners whose kept count differs per
sample work in a batch. Padding sits on the left, as in left-padded generation, so the last
slot of every sample is its last real token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor, nn


class Stage(str, Enum):
    """Where in the model a pruner acts."""

    VISION_LAYER = "vision_layer"  # after (or inside) a chosen vision-encoder layer
    VISION_OUTPUT = "vision_output"  # after the encoder and projector, before the LLM
    LLM_LAYER = "llm_layer"  # after a chosen LLM layer, during prefill
    DECODE = "decode"  # on the KV cache at each decoding step


# The model signals a pruner may need and a model family may provide (the "needs" contract). A pruner
# declares what it needs (`Pruner.needs`, plus what its stages imply, `STAGE_SIGNALS`); a family's runtime
# declares what it provides; `pruners.attach` rejects a pruner whose needs its family lacks.
SIGNALS = {
    "vision_layers": "VISION_LAYER hooks inside the vision encoder, on per-token states over the patch grid",
    "cls": "a CLS token in the vision encoder",
    "vision_attention": "attention among an image's visual tokens at VISION_OUTPUT (extras['vision_attention'])",
    "vision_features": "the encoder features before the projector, and the projector, at VISION_OUTPUT "
    "(extras['vision_hidden'], extras['projector'])",
    "grid": "each image's visual tokens at VISION_OUTPUT form a full rows x cols grid in raster order (state.grid)",
    "single_view": "each image is one view of ModelInfo.visual_tokens tokens, so counts and schedules fixed at "
    "setup hold for every image and vision-stage row (LLaVA-NeXT's images have varying views and token counts; "
    "its vision stages get each view's share of the budget, TokenState.quota)",
    "llm_layers": "LLM_LAYER hooks during prefill, with attention probes, keys and input embeddings",
    "decode": "DECODE hooks on the per-layer KV cache",
    "question": "the prompt's text at VISION_OUTPUT: the LLM input embeddings of each sample's non-image tokens "
    "(extras['text_embeds'] (B, L, D), extras['text_valid'] (B, L), extras['text_row'] (rows,): each row's sample)",
}
ALL_SIGNALS = frozenset(SIGNALS)
# Signals a stage implies: a pruner acting at a stage needs its family to offer that stage's hooks.
STAGE_SIGNALS = {
    Stage.VISION_LAYER: frozenset({"vision_layers"}),
    Stage.VISION_OUTPUT: frozenset(),
    Stage.LLM_LAYER: frozenset({"llm_layers"}),
    Stage.DECODE: frozenset({"decode"}),
}


# A probe returns attention of the current layer for chosen query rows, computed from that
# layer's own queries and keys (the model itself keeps running on SDPA / FlashAttention).
# Signature: probe(query_index (B, R) long, heads: "mean" | "max" | "none", logits: bool) -> Tensor
Probe = Callable[..., Tensor]


@dataclasses.dataclass
class TokenState:
    """The tokens present at one point of the forward pass, for a batch.

    Attributes:
        hidden: (B, N, D) hidden states of the tokens present.
        valid: (B, N) bool, False for padding slots.
        visual: (B, N) bool, which tokens are visual. At vision stages every patch token is
            visual and the CLS token is not (so it is never pruned by the generic helpers); on
            LLaVA-NeXT neither is a patch that unpadding drops before the LLM.
        positions: (B, N) long. At LLM stages the original position id of each token. At vision
            stages the patch index (row-major on `grid`) a token stands for; -1 for CLS.
        origin: (B, N) long index of each token in the stage's original sequence (the LLM input
            sequence, or the patch list); -1 for padding. The runtime uses it to map back.
        sizes: (B, N) float, how many original tokens each token stands for (merged tokens).
        stage: the stage this state is handed to.
        layer: the layer index for VISION_LAYER / LLM_LAYER, else None.
        grid: (rows, cols) of the image's patch grid.
        num_images: (B,) long, images per sample (LLM stages; 1 per row at vision stages).
        probe: attention probe for this layer; see `attention`.
        extras: signals a stage offers beyond the fields above (documented by the runtime).
        protected: (B, N) bool or None, tokens a pruner marked as never to be dropped by its later
            stages (MustDrop's key token set). The runtime carries it from the vision stages into
            the LLM sequence (a token's flag follows it); pruners read it and honour it themselves.
        view: (B,) long or None. At the vision stages of a multi-view family (LLaVA-NeXT: a base
            image plus high-resolution crops, each its own row with its own `grid`), the view each
            row holds: 0 = the base image, 1.. = the crops in row-major order of the crop grid.
            None: each row is a whole image.
        image: (B,) long or None, with `view`: the image (in the batch's image order) each row is a view of.
        quota: (B,) long or None, with `view`: this row's share of its image's budget, as the
            runtime splits it over the views; see `row_budget`.
    """

    hidden: Tensor
    valid: Tensor
    visual: Tensor
    positions: Tensor
    origin: Tensor
    sizes: Tensor
    stage: Stage
    layer: int | None = None
    grid: tuple[int, int] | None = None
    num_images: Tensor | None = None
    probe: Probe | None = None
    extras: dict = dataclasses.field(default_factory=dict)
    protected: Tensor | None = None
    view: Tensor | None = None
    image: Tensor | None = None
    quota: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    def row_budget(self, budget: int | None) -> int | Tensor | None:
        """Visual tokens this state's rows may keep: `quota` (B,) where the runtime split each image's
        budget over its views, else the per-image `budget` itself."""
        return budget if self.quota is None else self.quota

    def visual_count(self) -> Tensor:
        """(B,) number of valid visual tokens per sample."""
        return (self.visual & self.valid).sum(-1)

    def last_index(self) -> Tensor:
        """(B,) slot of the last valid token of each sample (the last slot, by the padding rule)."""
        return torch.full((self.batch_size,), self.num_tokens - 1, device=self.hidden.device)

    def attention(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        """Attention of this layer from the given query slots to every slot.

        Args:
            query_index: (B, R) long slots of the query rows.
            heads: "mean" or "max" over heads, or "none" to keep them as dim 1.
            logits: return the scaled pre-softmax logits (no mask) instead of probabilities.

        Returns:
            (B, R, N) or, with heads="none", (B, H, R, N), in float32. Probabilities respect the
            layer's own mask (causal and padding at LLM layers, padding at vision layers).
        """
        if self.probe is None:
            raise RuntimeError(f"no attention probe is available at stage {self.stage.value}")
        return self.probe(query_index, heads=heads, logits=logits)

    def replace(self, **changes) -> TokenState:
        return dataclasses.replace(self, **changes)

    def keep(self, index: Tensor, hidden: Tensor | None = None, sizes: Tensor | None = None) -> TokenState:
        """Keep the slots `index` (B, K) in that order; -1 marks padding (put it first).

        `hidden` and `sizes` (B, K, ...) replace the gathered values, for merging methods.
        The probe and extras do not carry over: they describe the layer before the cut.
        """
        pad = index < 0
        safe = index.clamp(min=0)

        def take(x: Tensor, fill) -> Tensor:
            out = torch.gather(x, 1, safe.view(*safe.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
            return out.masked_fill(pad.view(*pad.shape, *([1] * (x.dim() - 2))), fill)

        new_hidden = take(self.hidden, 0.0) if hidden is None else hidden.masked_fill(pad[..., None], 0.0)
        new_sizes = take(self.sizes, 0.0) if sizes is None else sizes.masked_fill(pad, 0.0)
        return dataclasses.replace(
            self,
            hidden=new_hidden,
            valid=take(self.valid, False),
            visual=take(self.visual, False),
            positions=take(self.positions, -1),
            origin=take(self.origin, -1),
            sizes=new_sizes,
            probe=None,
            extras={},
            protected=None if self.protected is None else take(self.protected, False),
        )


def scale_layers(layers: tuple[int, ...], paper_depth: int, depth: int) -> tuple[int, ...]:
    """A paper's layer schedule, given for a `paper_depth`-layer network, on a `depth`-layer one.

    Unchanged when the depths agree. Otherwise each layer keeps its relative depth: layer l goes
    to round(l * depth / paper_depth), clipped to 0..depth-1; duplicates are merged, order kept.
    (MustDrop's LLM layers 2, 6, 10, 14 of Vicuna's 32 become 0, 1, 2 on a 4-layer decoder.)
    """
    if depth == paper_depth:
        return tuple(layers)
    scaled = (min(depth - 1, max(0, round(layer * depth / paper_depth))) for layer in layers)
    return tuple(dict.fromkeys(scaled))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know about the model it is attached to (family-independent)."""

    family: str
    visual_tokens: int  # visual tokens per image at the LLM input, unpruned (576 for LLaVA-1.5)
    grid: tuple[int, int]  # patch grid of one image
    vision_layers: int  # number of vision-encoder layers
    vision_feature_layer: int  # index (>= 0) of the hidden state fed to the projector
    llm_layers: int  # number of decoder layers
    has_cls: bool  # the vision encoder has a CLS token
    provides: frozenset[str] = ALL_SIGNALS  # signals the family offers (`SIGNALS`); default: all, as LLaVA-1.5
    llm_width: int | None = None  # hidden size of the LLM decoder (learned pruners size their layers from it)


class Pruner(nn.Module):
    """Base class of every pruner. Subclasses implement the hooks of the stages they declare.

    Class attributes a subclass sets:
        name: registry name.
        stages: the stages it acts at.
        renumber_positions: kept tokens get contiguous position ids at the LLM input and after
            every cut (MustDrop, PDrop, VisionZip official code) instead of keeping their
            original ones (the default).
        proportional_attention: vision layers add log(size) of merged tokens to attention
            logits (ToMe).
        llm_hook_point: "block" (default: `llm_layer` runs after the whole decoder layer),
            "attn" (after the attention residual, before the MLP, as FiCoCo-L merges; the
            hooked layer's KV cache then holds every token its attention saw) or "pre" (before
            the layer, its probe built from that layer's own norm and q/k on the incoming
            tokens, as PDrop scores). An instance may override it.
        needs: model signals (`SIGNALS`) the method needs beyond those its stages imply
            (`STAGE_SIGNALS`): "cls" for a method that ranks by CLS attention, "grid" for pooling.
        fallback_needs: every signal a documented variant for models lacking some of the paper
            variant's signals needs instead (VisionZip's CLS-free variant); None: no such variant.
            `setup` picks the variant from `ModelInfo.provides`.
        fallback_label: the variant's name in messages and the support matrix.
        adaptive: the pruner decides each sample's visual-token count itself (DyVTE's learned exit layer), so it
            takes no `budget` (None only); sweeps and budget checks leave it out.
    Instance attributes set in `__init__` or `setup`:
        budget: visual tokens per image that reach the LLM's last layer (None: method default).
        vision_layers: vision layers after which `vision_layer` runs.
        vision_hook_point: "block" (after the whole layer) or "attn" (after the attention
            residual, before the MLP, as ToMe and FiCoCo-V merge).
        llm_layers: LLM layers after which `llm_layer` runs during prefill.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[frozenset[Stage]] = frozenset()
    renumber_positions: ClassVar[bool] = False
    proportional_attention: ClassVar[bool] = False
    llm_hook_point: ClassVar[str] = "block"
    needs: ClassVar[frozenset[str]] = frozenset()
    fallback_needs: ClassVar[frozenset[str] | None] = None
    fallback_label: ClassVar[str] = "variant"
    adaptive: ClassVar[bool] = False

    @classmethod
    def requirements(cls) -> frozenset[str]:
        """Every signal the paper variant needs: the declared `needs` and those its stages imply."""
        return cls.needs.union(*(STAGE_SIGNALS[stage] for stage in cls.stages))

    @classmethod
    def missing(cls, provides: frozenset[str]) -> frozenset[str]:
        """Signals the paper variant needs that `provides` lacks; empty if it, or the fallback variant, can run."""
        lacking = cls.requirements() - provides
        if lacking and cls.fallback_needs is not None and cls.fallback_needs <= provides:
            return frozenset()
        return lacking

    @classmethod
    def uses_fallback(cls, provides: frozenset[str]) -> bool:
        """True when only the fallback variant can run on a family that provides `provides`."""
        return not cls.requirements() <= provides and not cls.missing(provides)

    def __init__(self, budget: int | None = None) -> None:
        super().__init__()
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise ValueError(f"{self.name}: budget must be an int or None, got {budget!r}")
        if budget is not None and budget < 1:
            raise ValueError(f"{self.name}: budget must be at least 1, got {budget}")
        self.budget = budget
        self._budget_arg = budget  # what the user asked for; `setup` may resolve `budget` from it
        self.vision_layers: tuple[int, ...] = ()
        self.vision_hook_point = "block"
        self.llm_layers: tuple[int, ...] = ()
        self.info: ModelInfo | None = None

    def setup(self, info: ModelInfo) -> None:
        """Called by `attach` once the model is known: check the budget, fix layer schedules.

        Starts from the budget the user gave, so a second setup (another model) does not inherit
        a count a subclass resolved for the previous one.
        """
        self.budget = self._budget_arg
        if self.budget is not None and not 1 <= self.budget <= info.visual_tokens:
            raise ValueError(
                f"{self.name}: budget {self.budget} is out of range for this model: "
                f"allowed 1..{info.visual_tokens} visual tokens per image"
            )
        self.info = info

    def check_layers(self, layers: tuple[int, ...], count: int, what: str) -> None:
        """Reject layer indices the model does not have."""
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise ValueError(f"{self.name}: {what} {bad} out of range: allowed 0..{count - 1}")

    def on_attach(self, model: nn.Module) -> Callable[[], None] | None:
        """Called by `attach` with the model before the runtime wires it; returns what undoes its changes
        on detach (None: nothing to undo). Training-free pruners need nothing; a learned pruner checks the
        model is the one it was trained for and adds its LoRA adapter (`pruners.learned.LearnedPruner`)."""
        return None

    def vision_layer(self, state: TokenState) -> TokenState:
        raise NotImplementedError

    def vision_output(self, state: TokenState) -> TokenState:
        raise NotImplementedError

    def llm_layer(self, state: TokenState) -> TokenState:
        raise NotImplementedError

    def decode(self, cache) -> None:  # cache: runtime.decoder.DecodeCache
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"budget={self.budget}"
