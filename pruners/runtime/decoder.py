"""The decoder loop the runtime owns for an attached model (LLaMA-style decoders).

transformers 5.x runs a decoder as a short loop over its layers with one mask and one set of
rotary embeddings. Here the loop is ours, reusing the model's own layer modules, so that after
a pruner cuts tokens each later layer gets the mask and positions of its (shorter) sequence and
its KV cache really holds fewer entries. Every layer still runs on the model's own attention
implementation (SDPA by default): masks are passed as explicit boolean tensors.

Per layer we keep `LayerSlots`: which cache slots hold a real token, where it came from and
whether it is visual. Slots are left-padded per sample; a padding slot is never attended to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..base import Pruner, Stage, TokenState
from ..ops import attention_rows
from ..report import Stopwatch
from .capture import ProjectionCapture


@dataclass
class LayerSlots:
    """Bookkeeping of one layer's KV cache: (B, T) tensors aligned with the cache's T axis."""

    valid: Tensor
    origin: Tensor  # index in the original (unpruned) input coordinates; -1 for padding
    visual: Tensor

    def extend(self, new_origin: Tensor) -> LayerSlots:
        ones = torch.ones_like(new_origin, dtype=torch.bool)
        return LayerSlots(
            torch.cat([self.valid, ones], 1), torch.cat([self.origin, new_origin], 1),
            torch.cat([self.visual, ~ones], 1),
        )

    def take(self, index: Tensor) -> LayerSlots:
        pad, safe = index < 0, index.clamp(min=0)
        return LayerSlots(
            self.valid.gather(1, safe) & ~pad,
            self.origin.gather(1, safe).masked_fill(pad, -1),
            self.visual.gather(1, safe) & ~pad,
        )


class DecodeCache:
    """What a DECODE-stage pruner sees at each decoding step, and how it evicts entries.

    `keys(l)` / `values(l)` are (B, kv_heads, T_l, head_dim) tensors of layer l's cache;
    `slots(l)` says which entries are real, visual and where they came from. `keep(l, index)`
    keeps the entries `index` (B, K) (-1 = padding, placed first) of layer l: the cache tensors
    themselves are cut, so the layer's cache really shrinks.
    """

    def __init__(self, cache, slots: list[LayerSlots], step: int) -> None:
        self.cache = cache
        self._slots = slots
        self.step = step  # decoding steps already taken before this one (0 = first new token)

    @property
    def num_layers(self) -> int:
        return len(self._slots)

    def keys(self, layer: int) -> Tensor:
        return self.cache.layers[layer].keys

    def values(self, layer: int) -> Tensor:
        return self.cache.layers[layer].values

    def slots(self, layer: int) -> LayerSlots:
        return self._slots[layer]

    def keep(self, layer: int, index: Tensor) -> None:
        cl = self.cache.layers[layer]
        pad, safe = index < 0, index.clamp(min=0)
        gather = safe[:, None, :, None].expand(-1, cl.keys.shape[1], -1, cl.keys.shape[3])
        zero = pad[:, None, :, None]
        cl.keys = cl.keys.gather(2, gather).masked_fill(zero, 0.0)
        cl.values = cl.values.gather(2, gather).masked_fill(zero, 0.0)
        self._slots[layer] = self._slots[layer].take(index)


def prefill_mask(valid: Tensor) -> Tensor:
    """(B, 1, n, n) bool: causal over slots, padding keys hidden; padding rows see themselves.

    Slot order equals original order (cuts keep order), so slot-causal is position-causal. The
    diagonal keeps padding rows from being fully masked, which would give NaN in SDPA.
    """
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def decode_mask(past_valid: Tensor, q: int) -> Tensor:
    """(B, 1, q, T+q) bool mask for q new tokens after a cache whose real slots are `past_valid`."""
    bsz = past_valid.shape[0]
    new = torch.ones(q, q, dtype=torch.bool, device=past_valid.device).tril()
    past = past_valid[:, None, :].expand(bsz, q, -1)
    return torch.cat([past, new.expand(bsz, q, q)], -1)[:, None]


SUPPORTED_ATTENTION = ("sdpa", "eager")
# Where an LLM_LAYER hook runs: after the whole layer, after the attention residual and before the
# MLP (FiCoCo-L), or before the layer with its own queries and keys (PDrop). See `Pruner.llm_hook_point`.
LLM_HOOK_POINTS = ("block", "attn", "pre")


def as_attention_mask(mask: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """A boolean keep-mask in the form the layer's attention takes: SDPA takes it as is,
    eager attention adds it to the scores, so it gets 0 / dtype-min."""
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (B, H, n, hd) with cos/sin (B, n, hd), as LLaMA applies it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class LLMProbe:
    """Attention of one decoder layer from its own (captured) queries and keys, plus RoPE."""

    def __init__(self, layer: nn.Module, capture: ProjectionCapture, cos: Tensor, sin: Tensor, mask: Tensor):
        attn = layer.self_attn
        q, k = capture.get(attn)
        bsz, n, _ = q.shape
        self.query = rotate(q.view(bsz, n, -1, attn.head_dim).transpose(1, 2), cos, sin)
        self.key = rotate(k.view(bsz, n, -1, attn.head_dim).transpose(1, 2), cos, sin)
        self.scale = attn.scaling
        self.mask = mask[:, 0]

    def __call__(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        return attention_rows(self.query, self.key, query_index, self.scale, self.mask, heads, logits)


@dataclass
class Sequence:
    """The tokens flowing through the decoder during prefill."""

    hidden: Tensor
    valid: Tensor
    visual: Tensor
    positions: Tensor
    origin: Tensor
    num_images: Tensor
    protected: Tensor | None = None  # see TokenState.protected

    def slots(self) -> LayerSlots:
        return LayerSlots(self.valid, self.origin, self.visual & self.valid)


def contiguous_positions(positions: Tensor, valid: Tensor, new_valid: Tensor) -> Tensor:
    """Positions first, first + 1, ... over the `new_valid` slots, first = each sample's smallest valid
    position before the cut (0 at padding)."""
    first = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).amin(-1, keepdim=True)
    return (first + new_valid.long().cumsum(-1) - 1).masked_fill(~new_valid, 0)


def _project(seq: Sequence, layer: nn.Module) -> None:
    """Layer `layer`'s input norm and q/k projections on the incoming tokens, for a "pre" hook's probe
    (the capture keeps the outputs; the layer's own forward later recomputes them on the kept tokens)."""
    x = layer.input_layernorm(seq.hidden)
    layer.self_attn.q_proj(x)
    layer.self_attn.k_proj(x)


class DecoderRunner:
    """Runs a LLaMA-style decoder (embed -> layers -> norm) with pruner hooks.

    A hook runs after its whole layer, or, with `pruner.llm_hook_point == "attn"`, between the
    layer's attention residual and its MLP: that layer's KV cache keeps every token its attention
    saw, and its MLP and every later layer see the shorter sequence. With "pre" it runs before the
    layer: the probe applies the layer's input norm and q/k projections to the incoming tokens (one
    extra projection, as PDrop's official code), and the whole layer sees the shorter sequence.

    A hook's `state.extras`: "keys" (the layer's post-RoPE keys, from its probe) and "final_norm"
    (the decoder's final norm module, for pruners that compare tokens as the LM head sees them: DART) and
    "input_embeds" (the LLM input embeddings of the tokens present, slot-aligned: SparseVLM's raters).
    """

    def __init__(self, lm: nn.Module, pruner: Pruner, capture: ProjectionCapture, clock: Stopwatch) -> None:
        self.lm = lm
        self.pruner = pruner
        self.capture = capture
        self.clock = clock
        self.layers = list(lm.layers[: lm.config.num_hidden_layers])
        self.hook_layers = set(pruner.llm_layers) if Stage.LLM_LAYER in pruner.stages else set()
        if pruner.llm_hook_point not in LLM_HOOK_POINTS:
            raise ValueError(f"{pruner.name}: llm_hook_point {pruner.llm_hook_point!r} is not supported; "
                             f"allowed: {', '.join(LLM_HOOK_POINTS)}")
        self.mid = pruner.llm_hook_point == "attn"
        self.pre = pruner.llm_hook_point == "pre"
        # A cut after the last layer would change nothing; a cut before a layer may be before any.
        last = len(self.layers) - (1 if self.pre else 2)
        bad = sorted(i for i in self.hook_layers if not 0 <= i <= last)
        if bad:
            raise ValueError(f"{pruner.name}: LLM layer hooks {bad} out of range: allowed 0..{last}")
        self.implementation = lm.config._attn_implementation
        if self.implementation not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {self.implementation!r} is not supported by the runtime; "
                             f"supported: {', '.join(SUPPORTED_ATTENTION)}")

    def _mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        return as_attention_mask(mask, self.implementation, dtype)

    def prefill(self, seq: Sequence, cache, grid) -> tuple[Tensor, Sequence, list[LayerSlots], list[Tensor]]:
        """Returns the normed output, the final sequence, each layer's cache slots and token counts."""
        slots, counts = [], []
        if self.pruner.renumber_positions:  # close the gaps a vision-stage cut left, as a shorter input would
            seq.positions = contiguous_positions(seq.positions, seq.valid, seq.valid)
        self._inputs = (seq.hidden, seq.origin, seq.valid)  # for extras["input_embeds"]
        mask = prefill_mask(seq.valid)
        layer_mask = self._mask(mask, seq.hidden.dtype)
        cos, sin = self.lm.rotary_emb(seq.hidden, position_ids=self.rope_positions(seq))
        for i, layer in enumerate(self.layers):
            if self.pre and i in self.hook_layers:
                self.clock.run(_project, seq, layer)  # the pruner's cost, so its clock
                seq, mask, layer_mask, cos, sin = self._apply_cut(seq, i, layer, cos, sin, mask, layer_mask, grid)
            slots.append(seq.slots())
            before = torch.stack([seq.valid.sum(-1), (seq.visual & seq.valid).sum(-1)])
            args = {"attention_mask": layer_mask, "position_embeddings": (cos, sin), "position_ids": seq.positions,
                    "past_key_values": cache, "use_cache": cache is not None}
            hooked = i in self.hook_layers and not self.pre
            if hooked and self.mid:
                # LlamaDecoderLayer.forward split at the residual after attention: the cut happens
                # between attention and MLP, so this layer's cache holds every token its attention saw.
                attn_out, _ = layer.self_attn(layer.input_layernorm(seq.hidden), **args)
                seq.hidden = seq.hidden + attn_out
            else:
                seq.hidden = layer(seq.hidden, **args)
            if hooked:
                seq, mask, layer_mask, cos, sin = self._apply_cut(seq, i, layer, cos, sin, mask, layer_mask, grid)
            if hooked and self.mid:
                seq.hidden = seq.hidden + layer.mlp(layer.post_attention_layernorm(seq.hidden))
            # Tokens, visual tokens, and tokens the MLP saw (fewer when the hook cut between the two).
            counts.append(torch.cat([before, (seq.valid.sum(-1) if hooked and self.mid else before[0])[None]]))
        return self.lm.norm(seq.hidden), seq, slots, counts

    def _apply_cut(self, seq: Sequence, i: int, layer, cos, sin, mask, layer_mask, grid) -> tuple:
        """Runs the hook; returns the (possibly new) sequence with its masks and rotary tables."""
        new = self._cut(seq, i, layer, cos, sin, mask, grid)
        if new is None:
            return seq, mask, layer_mask, cos, sin
        mask = prefill_mask(new.valid)
        cos, sin = self.lm.rotary_emb(new.hidden, position_ids=self.rope_positions(new))
        return new, mask, self._mask(mask, new.hidden.dtype), cos, sin

    def rope_positions(self, seq: Sequence) -> Tensor:
        """The position ids the rotary embedding takes for the tokens of `seq`: their 1-D positions. A family
        with multi-axis rotary positions (Qwen2-VL's 3-D M-RoPE) overrides this."""
        return seq.positions

    def _cut(self, seq: Sequence, i: int, layer, cos, sin, mask, grid) -> Sequence | None:
        probe = LLMProbe(layer, self.capture, cos, sin, mask)
        state = TokenState(
            hidden=seq.hidden, valid=seq.valid, visual=seq.visual, positions=seq.positions, origin=seq.origin,
            sizes=torch.ones_like(seq.valid, dtype=seq.hidden.dtype), stage=Stage.LLM_LAYER, layer=i, grid=grid,
            num_images=seq.num_images, probe=probe,
            extras={"keys": probe.key, "final_norm": self.lm.norm, "input_embeds": self._input_embeds(seq)},
            protected=seq.protected,
        )
        new = self.clock.run(self.pruner.llm_layer, state)
        self.capture.clear()
        if new is state:
            return None
        positions = new.positions
        if self.pruner.renumber_positions:
            positions = contiguous_positions(seq.positions, seq.valid, new.valid)
        return Sequence(new.hidden, new.valid, new.visual, positions.masked_fill(~new.valid, 0), new.origin,
                        seq.num_images, new.protected)

    def _input_embeds(self, seq: Sequence) -> Tensor:
        """The LLM input embeddings of the tokens now present, slot-aligned by origin (zeros at padding)."""
        hidden, origin, valid = self._inputs
        if seq.origin.shape == origin.shape and torch.equal(seq.origin, origin):
            return hidden
        bsz, _, width = hidden.shape
        # Scatter by origin into a full-length table (padding to an extra last column), then gather.
        length = int(origin.max()) + 2
        index = torch.where(valid, origin, length - 1)[..., None].expand(-1, -1, width)
        table = hidden.new_zeros(bsz, length, width).scatter(1, index, hidden)
        now = torch.where(seq.valid, seq.origin, length - 1)[..., None].expand(-1, -1, width)
        return table.gather(1, now)

    def decode(self, hidden: Tensor, positions: Tensor, origin: Tensor, cache, slots: list[LayerSlots],
               rope_positions: Tensor | None = None) -> Tensor:
        """Runs q new tokens (B, q) through every layer against each layer's own cache. `rope_positions`: the
        rotary position ids when they differ from `positions` (Qwen2-VL's (3, B, q) M-RoPE ids)."""
        cos, sin = self.lm.rotary_emb(hidden, position_ids=positions if rope_positions is None else rope_positions)
        q = hidden.shape[1]
        for i, layer in enumerate(self.layers):
            mask = decode_mask(slots[i].valid, q)
            slots[i] = slots[i].extend(origin)
            hidden = layer(hidden, attention_mask=self._mask(mask, hidden.dtype), position_embeddings=(cos, sin),
                           position_ids=positions, past_key_values=cache, use_cache=True)
        self.capture.clear()
        return self.lm.norm(hidden)
