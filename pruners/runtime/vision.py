"""The vision-encoder loop the runtime owns (CLIP-style: embeddings, pre-norm, layers).

It runs the encoder's own layers up to the one whose input LLaVA feeds to the projector
(`hidden_states[vision_feature_layer]`), calling VISION_LAYER hooks where the pruner asks,
either after a whole layer or after its attention residual (before the MLP). Layers past
the feature layer are not run: their output is never used.

Tokens cut in the encoder shorten every later layer. Padding slots (ragged cuts) are hidden
from attention with an additive mask; with `proportional_attention` the mask also adds
log(size) of merged tokens (ToMe, Sec. 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import Pruner, Stage, TokenState
from ..ops import attention_rows
from ..report import Stopwatch
from .capture import ProjectionCapture


def vision_mask(state: TokenState, proportional: bool) -> Tensor | None:
    """Additive (B, 1, 1, n) mask, or None when every slot is real and unmerged (the HF path)."""
    if state.valid.all() and not (proportional and (state.sizes != 1).any()):
        return None
    neg = torch.finfo(state.hidden.dtype).min
    bias = torch.zeros_like(state.sizes, dtype=state.hidden.dtype)
    if proportional:
        bias = state.sizes.clamp_min(1).log().to(state.hidden.dtype)
    return bias.masked_fill(~state.valid, neg)[:, None, None, :]


class VisionProbe:
    """Attention of one vision layer from queries and keys of its (normed) input."""

    def __init__(self, layer: nn.Module, query: Tensor, key: Tensor, valid: Tensor) -> None:
        attn = layer.self_attn
        bsz, n, _ = query.shape
        self.query = query.view(bsz, n, -1, attn.head_dim).transpose(1, 2)
        self.key = key.view(bsz, n, -1, attn.head_dim).transpose(1, 2)
        self.scale = attn.scale
        self.mask = valid[:, None, :].expand(bsz, n, n)

    @classmethod
    def from_input(cls, layer: nn.Module, hidden: Tensor, valid: Tensor) -> VisionProbe:
        normed = layer.layer_norm1(hidden)
        return cls(layer, layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed), valid)

    def __call__(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        return attention_rows(self.query, self.key, query_index, self.scale, self.mask, heads, logits)


class VisionRunner:
    def __init__(self, tower: nn.Module, pruner: Pruner, capture: ProjectionCapture, feature_layer: int,
                 grid: tuple[int, int], clock: Stopwatch) -> None:
        self.tower = tower
        self.pruner = pruner
        self.capture = capture
        self.clock = clock
        self.layers = list(tower.encoder.layers)
        self.feature_layer = feature_layer
        self.grid = grid
        active = Stage.VISION_LAYER in pruner.stages
        self.hook_layers = set(pruner.vision_layers) if active else set()
        self.mid = active and pruner.vision_hook_point == "attn"
        late = sorted(i for i in self.hook_layers if not 0 <= i < feature_layer)
        if late:
            raise ValueError(f"{pruner.name}: vision layer hooks {late} out of range: allowed 0..{feature_layer - 1} "
                             f"(layers whose output reaches the LLM; features are the input of layer {feature_layer})")

    def initial_state(self, pixel_values: Tensor) -> TokenState:
        hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        bsz, n, _ = hidden.shape
        slots = torch.arange(n, device=hidden.device).expand(bsz, n)
        return TokenState(
            hidden=hidden, valid=torch.ones(bsz, n, dtype=torch.bool, device=hidden.device), visual=slots > 0,
            positions=slots - 1, origin=slots, sizes=torch.ones(bsz, n, device=hidden.device),
            stage=Stage.VISION_LAYER, grid=self.grid,
        )

    def run(self, pixel_values: Tensor, **fields) -> tuple[TokenState, list[Tensor]]:
        """Features (the input of the feature layer, CLS included) and, per layer run, the tokens its
        attention and its MLP saw ((2, images) each: they differ where a hook cuts between the two).
        `fields` replace those of the initial state (a multi-view family's `view`, `quota`, ...)."""
        state = self.initial_state(pixel_values).replace(**fields)
        counts = []
        for i in range(self.feature_layer):
            before = state.valid.sum(-1)
            state = self._layer(i, state)
            mid_cut = i in self.hook_layers and self.mid
            counts.append(torch.stack([before, state.valid.sum(-1) if mid_cut else before]))
        return state, counts

    def _layer(self, i: int, state: TokenState) -> TokenState:
        layer = self.layers[i]
        mask = vision_mask(state, self.pruner.proportional_attention)
        hooked = i in self.hook_layers
        if hooked and self.mid:
            # CLIPEncoderLayer.forward, split at the residual after attention.
            attn_out, _ = layer.self_attn(layer.layer_norm1(state.hidden), attention_mask=mask)
            state = self._hook(i, state.replace(hidden=state.hidden + attn_out), layer)
            return state.replace(hidden=state.hidden + layer.mlp(layer.layer_norm2(state.hidden)))
        state = state.replace(hidden=layer(state.hidden, attention_mask=mask))
        return self._hook(i, state, layer) if hooked else state

    def _hook(self, i: int, state: TokenState, layer: nn.Module) -> TokenState:
        q, k = self.capture.get(layer.self_attn)
        probe = VisionProbe(layer, q, k, state.valid)
        new = self.clock.run(self.pruner.vision_layer, state.replace(layer=i, probe=probe, extras={"keys": probe.key}))
        self.capture.clear()
        return new.replace(stage=Stage.VISION_LAYER, layer=None, probe=None, extras={})
