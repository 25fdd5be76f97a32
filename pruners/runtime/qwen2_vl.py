"""Runtime for Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

While attached, `model.model.forward` (the `Qwen2VLModel` / `Qwen2_5_VLModel`) is replaced on the instance by
`QwenVLRuntime.forward`; the model's own modules do all the work, and leaving `attach` removes that attribute
and every hook, so the model is restored exactly.

Prefill: the model's own vision tower runs unchanged (patch embedding, blocks attending within each image or,
in Qwen2.5-VL, within windows, the 2x2 patch merger) -> VISION_OUTPUT hook on the merged tokens, one row per
image -> the kept tokens are put back at their own image slots and the sequence is compacted (left padding)
-> decoder loop (LLM_LAYER hooks, `DecoderRunner`) -> outputs scattered back to the input's length.
Decode: each layer attends to its own cache; DECODE hooks may cut caches.

What the family provides (`provides`, see `pruners.base.SIGNALS`): `vision_attention`, `grid`, `single_view`
(one row per image at VISION_OUTPUT), `llm_layers`, `decode`. It does not provide `cls` (the encoder has no
CLS token), `vision_layers` (a token cut inside the encoder would break the merger, which concatenates the
four patches of every 2x2 group, and Qwen2.5-VL's window partition; so the encoder gets no hooks) nor
`vision_features` (the merger is the projector and takes four patches at a time, so encoder features cannot
be merged and then projected one by one).

Budget and image sizes: `budget` counts merged tokens per image, the tokens the LLM sees. Qwen images come
in many sizes, and budgets, defaults and layer schedules derive from the tokens per image, so `pruner.setup`
runs at each prefill with that batch's `ModelInfo` (visual_tokens = merged tokens per image, grid = the
merged rows x cols). One batch holds images of one size (the same `image_grid_thw` row); a budget larger
than an image's tokens is rejected at that prefill. A batch without images runs unpruned.

Positions: every token keeps its 3-D (t, h, w) M-RoPE position id, the model's own (`get_rope_index` via
`compute_3d_position_ids`, or those `generate` passes); a merged token takes its image slot's. Pruners that
renumber positions (`renumber_positions`) are not renumbered here: M-RoPE ids carry the image layout, so
renumbering would move tokens in h and w. Decoding continues with the model's own positions (its
`rope_deltas`), which the shorter caches do not change.

`extras["vision_attention"]` (a probe, see `MergedVisionProbe`): attention of the last vision block (its
output is what the merger merges) among one image's patches, rebuilt from that block's captured qkv
projection and its rotary embeddings within the block's own attention segments, pooled to merged tokens.

Report: LLM FLOPs from the Qwen2 text config (grouped-query attention counted exactly, as for LLaMA).
Vision FLOPs cover every encoder block on all patches, attention counted per image or, in Qwen2.5-VL's windowed
blocks, per window (`SampleRecord.vision_attention_pairs`), and the merger (two matrices on the merged tokens);
the patch embedding is not counted (nor is CLIP's).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.vision_utils import get_vision_window_index

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..flops import DecoderShape
from ..ops import attention_rows, reduce_heads
from ..report import EfficiencyReport, Stopwatch, Timer, VisionShape
from .capture import ProjectionCapture
from .decoder import DecodeCache, DecoderRunner, Sequence
from .llava import LlavaRuntime, keep_pixels_for_forward

FAMILIES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
UNSUPPORTED_KWARGS = ("output_attentions", "output_hidden_states")


def vision_shape(model) -> VisionShape:
    """Encoder width and MLP of either generation, and the merger (in = hidden = 4 x width, out = LLM width)."""
    vcfg = model.config.vision_config
    merger = model.model.visual.merger
    if hasattr(vcfg, "embed_dim"):  # Qwen2-VL: LayerNorm blocks, fc1/fc2 MLP of mlp_ratio x width
        width, mlp, matrices = vcfg.embed_dim, int(vcfg.embed_dim * vcfg.mlp_ratio), 2
    else:  # Qwen2.5-VL: RMSNorm blocks, SwiGLU MLP
        width, mlp, matrices = vcfg.hidden_size, vcfg.intermediate_size, 3
    first, last = merger.mlp[0], merger.mlp[2]
    return VisionShape(width, mlp, first.in_features, last.out_features, matrices, first.out_features)


class MergedVisionProbe:
    """Attention of one vision block among each image's patches, pooled to the merged (2x2) tokens.

    Built from the block's captured qkv output, its rotary embeddings and the attention segments it ran with
    (`cu_seqlens`: the whole image, or a window), so no attention weights are asked of the model. Patches are
    reordered from the block's order (Qwen2.5-VL permutes 2x2 groups into windows) to merged-raster order:
    patch u of merged token j sits at j * unit + u.

    Pooling: probability of merged token i to merged token j = mean over i's `unit` query patches of the
    summed probability on j's key patches (rows still sum to 1); logits are averaged over both groups.
    """

    def __init__(self, query: Tensor, key: Tensor, segment: Tensor, scale: float, unit: int) -> None:
        self.query, self.key = query, key  # (I, H, P, hd), P = unit * merged tokens, merged-raster order
        self.mask = segment[:, :, None] == segment[:, None, :]  # (I, P, P): same attention segment
        self.scale, self.unit = scale, unit

    def __call__(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        images, n_heads, patches, _ = self.query.shape
        unit, tokens = self.unit, patches // self.unit
        rows = (query_index[..., None] * unit + torch.arange(unit, device=query_index.device)).flatten(1)
        attn = attention_rows(self.query, self.key, rows, self.scale, self.mask, heads="none", logits=logits)
        attn = attn.view(images, n_heads, query_index.shape[1], unit, tokens, unit).mean(3)
        attn = attn.mean(-1) if logits else attn.sum(-1)  # (I, H, R, tokens)
        return reduce_heads(attn, heads)

    def keys(self) -> Tensor:
        """(I, H, merged tokens, hd): each merged token's key, the mean of its patches' (post-rotary) keys."""
        images, n_heads, patches, hd = self.key.shape
        return self.key.view(images, n_heads, patches // self.unit, self.unit, hd).mean(3)


class _BlockCapture:
    """Forward hooks on the last vision block: its qkv output and the segments and rotary tables it ran with."""

    def __init__(self, block) -> None:
        self.block, self.store, self.handles = block, {}, []

    def install(self) -> None:
        if self.handles:
            return
        attn = self.block.attn
        self.handles.append(attn.qkv.register_forward_hook(lambda m, a, out: self.store.__setitem__("qkv", out)))
        self.handles.append(attn.register_forward_pre_hook(self._inputs, with_kwargs=True))

    def _inputs(self, module, args, kwargs) -> None:
        self.store["cu_seqlens"] = kwargs["cu_seqlens"]
        self.store["position_embeddings"] = kwargs["position_embeddings"]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.store.clear()


class QwenDecoderRunner(DecoderRunner):
    """The decoder loop with M-RoPE: the rotary ids of the tokens present are read off the prefill's (3, B, L)
    table by each token's origin, so a kept token keeps its (t, h, w) id whatever its 1-D position says. The
    runtime sets `rope` before each prefill."""

    rope: Tensor

    def rope_positions(self, seq: Sequence) -> Tensor:
        index = seq.origin.clamp(min=0)[None].expand(3, -1, -1)
        return self.rope.gather(2, index).masked_fill(~seq.valid[None], 0)


class QwenVLRuntime(LlavaRuntime):
    """Qwen's own loop; LLaVA's helpers are reused (`_merge`, `_compact`, `_per_sample`, `_records`, `_kv_bytes`).
    `__init__` does not call LLaVA's, which would build a CLIP loop."""

    provides = frozenset({"vision_attention", "grid", "single_view", "llm_layers", "decode"})

    def __init__(self, model, pruner: Pruner) -> None:
        self.model = model
        self.core = model.model
        self.pruner = pruner
        cfg = model.config
        self.family = FAMILIES[type(model).__name__]
        lm = self.core.language_model
        if "sliding_attention" in (getattr(lm.config, "layer_types", None) or []):
            raise ValueError(
                "sliding-window decoder layers are not supported by the runtime; allowed: "
                "use_sliding_window=False (the Qwen2-VL / Qwen2.5-VL default)"
            )
        self.image_token_id = cfg.image_token_id
        self.visual = self.core.visual
        self.unit = self.visual.spatial_merge_size**2
        self.capture = ProjectionCapture()
        self.block = _BlockCapture(self.visual.blocks[-1])
        self.clock = Stopwatch()
        self.info: ModelInfo | None = None
        self.decoder: QwenDecoderRunner | None = None
        self.report = EfficiencyReport(pruner.name, DecoderShape.from_config(cfg.text_config), vision_shape(model))
        self._gen: dict | None = None

    # -- attach / detach ----------------------------------------------------------------------
    def __enter__(self) -> EfficiencyReport:
        self.core.forward = self.forward
        keep_pixels_for_forward(self.core)
        return self.report

    def __exit__(self, *exc) -> None:
        del self.core.forward
        del self.core.get_image_features
        self.capture.remove()
        self.block.remove()
        self._gen = None

    # -- per-batch setup ------------------------------------------------------------------------
    def _image_info(self, grid_thw: Tensor) -> ModelInfo:
        """What the pruner is told for a batch of images of one size (`grid_thw` rows: t, h, w patches)."""
        sizes = {tuple(row) for row in grid_thw.tolist()}
        if len(sizes) != 1:
            raise ValueError(
                f"images of different sizes in one batch ({sorted(sizes)} as (t, h, w) patch grids); "
                "allowed: one image size per batch (budgets and schedules follow the tokens per image)"
            )
        t, h, w = sizes.pop()
        merge = self.visual.spatial_merge_size
        if t != 1:
            raise ValueError(f"image grid t={t}: only still images (t=1) are supported, not videos")
        rows, cols = h // merge, w // merge
        depth = len(self.visual.blocks)
        return ModelInfo(
            family=self.family,
            visual_tokens=rows * cols,
            grid=(rows, cols),
            vision_layers=depth,
            vision_feature_layer=depth,
            llm_layers=self.core.language_model.config.num_hidden_layers,
            has_cls=False,
            provides=self.provides,
            llm_width=self.core.language_model.config.hidden_size,
        )

    def _setup(self, info: ModelInfo) -> None:
        """Set the pruner up for this image size (once per size) and rebuild the decoder loop for its schedule."""
        if info == self.info:
            return
        self.pruner.setup(info)
        self.info = info
        self.capture.remove()
        self.decoder = self._decoder(self.pruner)
        for i in self.decoder.hook_layers:
            self.capture.watch(self.decoder.layers[i].self_attn)
        if Stage.VISION_OUTPUT in self.pruner.stages:
            self.block.install()

    def _decoder(self, pruner: Pruner) -> QwenDecoderRunner:
        return QwenDecoderRunner(self.core.language_model, pruner, self.capture, self.clock)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        for key in UNSUPPORTED_KWARGS:
            if kwargs.get(key):
                raise ValueError(f"{key}=True is not supported while a pruner is attached")
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("video inputs are not supported while a pruner is attached; allowed: images")
        if mm_encoder_outputs:
            raise ValueError("pre-encoded mm_encoder_outputs cannot be pruned; pass pixel_values while attached")
        if input_ids is None:
            raise ValueError("an attached model needs input_ids (to find the image tokens), not inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("an attached model takes a 2-D attention_mask (batch, length)")
        lm = self.core.language_model
        use_cache = lm.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return self._decode(input_ids, position_ids, past_key_values)
        if past_key_values is None and use_cache:
            past_key_values = DynamicCache(config=lm.config)
        embeds = self.core.get_input_embeddings()(input_ids)
        if position_ids is None:  # the model's own 3-D ids (get_rope_index); it also keeps its rope_deltas
            position_ids = self.core.compute_3d_position_ids(
                input_ids=input_ids,
                inputs_embeds=embeds,
                image_grid_thw=image_grid_thw,
                video_grid_thw=None,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                mm_token_type_ids=mm_token_type_ids,
            )
        text, rope = self._split_positions(position_ids, input_ids.shape)
        return self._prefill(
            input_ids, embeds, attention_mask, text, rope, pixel_values, image_grid_thw, past_key_values
        )

    @staticmethod
    def _split_positions(position_ids: Tensor | None, shape) -> tuple[Tensor, Tensor]:
        """(B, L) 1-D positions and (3, B, L) M-RoPE ids, as the text model splits what it is given."""
        bsz, length = shape
        if position_ids is None:  # text only: the model's default 0..L-1
            position_ids = torch.arange(length).expand(bsz, length)
        if position_ids.dim() == 2:
            return position_ids, position_ids[None].expand(3, -1, -1)
        if position_ids.shape[0] == 4:  # generate's [text; t; h; w]
            return position_ids[0], position_ids[1:]
        return position_ids[0], position_ids

    def _prefill(
        self, input_ids, embeds, attention_mask, text, rope, pixel_values, grid_thw, cache
    ) -> BaseModelOutputWithPast:
        device = input_ids.device
        bsz, length = input_ids.shape
        with Timer(device) as timer:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            image_mask = input_ids == self.image_token_id
            seq, vision_counts, proj_tokens, pruned = self._sequence(
                embeds, valid, text.to(device), image_mask, pixel_values, grid_thw
            )
            decoder = self.decoder if pruned else self._decoder(_UNPRUNED)
            decoder.rope = rope.to(device).expand(3, bsz, length)
            hidden, final, slots, counts = decoder.prefill(seq, cache, self.info.grid if pruned else None)
            out = self._to_input_slots(hidden, final, length)
        self._gen = {"cache": cache, "slots": slots, "length": length, "step": 0, "decoder": decoder, "pruned": pruned}
        records = self._records([c[:2] for c in vision_counts], proj_tokens, counts, image_mask)
        for b, rec in enumerate(records):  # each image, or window, attends on its own
            rec.vision_attention_pairs = [int(c[2, b]) for c in vision_counts]
        self.report.add_prefill(records, timer.ms, self.clock.take())
        if cache is not None:
            self.report.update_kv(self._kv_bytes(cache, slots), prefill=True)
        return BaseModelOutputWithPast(last_hidden_state=out, past_key_values=cache)

    def _decode(self, input_ids, position_ids, cache) -> BaseModelOutputWithPast:
        gen = self._generation(cache)
        device = input_ids.device
        bsz, q = input_ids.shape
        with Timer(device) as timer:
            if gen["pruned"] and Stage.DECODE in self.pruner.stages:
                self.pruner.decode(DecodeCache(cache, gen["slots"], gen["step"]))  # inside the step's timer
            origin = (gen["length"] + torch.arange(q, device=device)).expand(bsz, q)
            if position_ids is None:  # the model's own rule without positions: past length + step + rope_deltas
                deltas = self.core.rope_deltas
                text, rope = origin, origin if deltas is None else origin + deltas.to(device)
            else:
                text, rope = self._split_positions(position_ids, (bsz, q))
            embeds = self.core.get_input_embeddings()(input_ids)
            hidden = gen["decoder"].decode(
                embeds, text.expand(bsz, q), origin, cache, gen["slots"], rope_positions=rope.expand(3, bsz, q)
            )
        gen["length"] += q
        gen["step"] += q
        self.report.add_decode_step(timer.ms / q)
        self.report.update_kv(self._kv_bytes(cache, gen["slots"]), prefill=False)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    # -- vision -> sequence -------------------------------------------------------------------
    def _sequence(self, embeds, valid, positions, image_mask, pixel_values, grid_thw):
        """The decoder's input sequence with the (pruned) image tokens in their image slots; whether it is pruned."""
        bsz = embeds.shape[0]
        n_img_tokens = int(image_mask.sum())
        if pixel_values is None or n_img_tokens == 0:
            if n_img_tokens:
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            num_images = torch.zeros(bsz, dtype=torch.long, device=embeds.device)
            return self._compact(embeds, valid, positions, image_mask, num_images), [], 0, False
        if grid_thw is None:
            raise ValueError("pixel_values need their image_grid_thw (as the processor returns them)")
        info = self._image_info(grid_thw)
        self._setup(info)
        visual = info.visual_tokens
        if n_img_tokens != grid_thw.shape[0] * visual:
            raise ValueError(
                f"input_ids hold {n_img_tokens} image tokens for {grid_thw.shape[0]} image(s) of "
                f"{visual} merged tokens each"
            )
        state, vision_counts = self._encode(pixel_values, grid_thw, info)
        slots = image_mask.flatten().nonzero()[:, 0].view(-1, visual)  # (images, visual) flat (b * L + l)
        sample = slots[:, 0] // image_mask.shape[1]
        kept = state.valid
        target = torch.gather(slots, 1, state.positions.clamp(min=0))[kept]  # the image slot each token takes
        num_images = torch.bincount(sample, minlength=bsz)
        protected = None if state.protected is None else state.protected[kept]
        hidden = state.hidden[kept]
        seq = self._merge(embeds, valid, positions, image_mask, image_mask, target, hidden, num_images, protected)
        per_sample = [self._per_sample(c, sample, bsz) for c in vision_counts]
        return seq, per_sample, self._per_sample(state.valid.sum(-1), sample, bsz), True

    def _encode(self, pixel_values: Tensor, grid_thw: Tensor, info: ModelInfo) -> tuple[TokenState, list[Tensor]]:
        """The model's own vision tower and merger, then the VISION_OUTPUT hook (one row per image). Also, per
        vision block, (3, images): tokens its attention and its MLP saw, and its attention's query-key pairs."""
        images, n = grid_thw.shape[0], info.visual_tokens
        merged = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw).pooler_output
        hidden = merged.view(images, n, -1)
        device = hidden.device
        slots = torch.arange(n, device=device).expand(images, n)
        ones = torch.ones(images, n, dtype=torch.bool, device=device)
        state = TokenState(
            hidden=hidden,
            valid=ones,
            visual=ones,
            positions=slots,
            origin=slots,
            sizes=torch.ones(images, n, device=device),
            stage=Stage.VISION_OUTPUT,
            grid=info.grid,
        )
        if Stage.VISION_OUTPUT in self.pruner.stages:
            state.extras["vision_attention"] = _LazyMergedProbe(self, grid_thw, images)
            state = self.clock.run(self.pruner.vision_output, state)
        self.block.store.clear()
        patches = torch.full((images,), n * self.unit, device=device)
        return state, [
            torch.stack([patches, patches, torch.full_like(patches, pairs)])
            for pairs in self._attention_pairs(grid_thw[:1])
        ]

    def _attention_pairs(self, grid_thw: Tensor) -> list[int]:
        """Per vision block, the query-key pairs of one image: (patches)^2, or the sum of window^2 in
        Qwen2.5-VL's windowed blocks (their `cu_window_seqlens`, as the tower computes them)."""
        patches = int(grid_thw.prod())
        full = patches * patches
        if not hasattr(self.visual, "window_size"):
            return [full] * len(self.visual.blocks)
        _, cu = get_vision_window_index(
            grid_thw, self.visual.spatial_merge_size, self.visual.window_size, self.visual.patch_size
        )
        windowed = int(((cu[1:] - cu[:-1]).long() ** 2).sum())
        return [full if i in self.visual.fullatt_block_indexes else windowed for i in range(len(self.visual.blocks))]

    def _probe(self, grid_thw: Tensor, images: int) -> MergedVisionProbe:
        """The last block's attention probe, from what `_BlockCapture` kept of its forward."""
        store = self.block.store
        if "qkv" not in store:
            raise RuntimeError("no captured vision block: the runtime did not watch it")
        attn = self.visual.blocks[-1].attn
        qkv = store["qkv"]
        total = qkv.shape[0]
        q, k, _ = qkv.reshape(total, 3, attn.num_heads, -1).unbind(1)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the model's own rotary step
        cos, sin = store["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        cu = store["cu_seqlens"].to(qkv.device)
        segment = torch.searchsorted(cu, torch.arange(total, device=qkv.device), right=True) - 1
        order = self._raster_order(grid_thw, total, qkv.device)
        per_image = lambda x: x[order].view(images, total // images, *x.shape[1:])  # noqa: E731
        query, key = (per_image(x).transpose(1, 2) for x in (q, k))  # (I, H, P, hd)
        return MergedVisionProbe(query, key, per_image(segment), attn.scaling, self.unit)

    def _raster_order(self, grid_thw: Tensor, total: int, device) -> Tensor:
        """(patches,) block-order index of each patch in merged-raster order (Qwen2.5-VL permutes 2x2 groups
        into windows before its blocks; Qwen2-VL keeps raster order)."""
        unit = self.unit
        groups = torch.arange(total // unit, device=device)
        if hasattr(self.visual, "window_size"):
            window_index, _ = get_vision_window_index(
                grid_thw, self.visual.spatial_merge_size, self.visual.window_size, self.visual.patch_size
            )
            groups = torch.argsort(window_index.to(device))  # raster group -> its place in block order
        return (groups[:, None] * unit + torch.arange(unit, device=device)).flatten()


class _LazyMergedProbe:
    """`MergedVisionProbe` of the batch being pruned, built only if a pruner asks for it."""

    def __init__(self, runtime: QwenVLRuntime, grid_thw: Tensor, images: int) -> None:
        self.runtime, self.grid_thw, self.images, self.probe = runtime, grid_thw, images, None

    def _built(self) -> MergedVisionProbe:
        if self.probe is None:
            self.probe = self.runtime._probe(self.grid_thw, self.images)
        return self.probe

    def __call__(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        return self._built()(query_index, heads=heads, logits=logits)

    def keys(self) -> Tensor:
        return self._built().keys()


class _Unpruned(Pruner):
    """Stands in for the pruner on a batch without images (no ModelInfo to set a pruner up with)."""

    name = "unpruned"


_UNPRUNED = _Unpruned()
