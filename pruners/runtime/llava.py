"""Runtime for LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP vision tower, LLaMA decoder).

While attached, `model.model.forward` (the `LlavaModel`) is replaced by `LlavaRuntime.forward`
on the instance; the model's own modules do all the work. Leaving `attach` deletes that
attribute and the capture hooks, so the model is restored exactly (no parameter is touched).

Prefill: vision loop (VISION_LAYER hooks) -> projector -> VISION_OUTPUT hook -> the kept image
tokens are put back in the text at their own image slots, the sequence is compacted (left
padding) -> decoder loop (LLM_LAYER hooks) -> outputs are scattered back to the input's length,
so `logits` line up with `input_ids` as usual (positions of dropped tokens hold zeros).
Decode: each layer attends to its own cache with its own mask; DECODE hooks may cut caches.

VISION_OUTPUT extras: "vision_hidden" and "vision_attention" (the features before the projector and the
attention among them), "projector", and the prompt's text (signal "question": "text_embeds" (B, L, D) LLM input
embeddings, "text_valid" (B, L) its non-image, non-padding tokens, "text_row" (rows,) each row's sample).

Position ids: kept tokens keep their original ids (those `generate` passes, or HF's default
0..L-1). A merged image token takes the id of the image slot it stands for (`positions`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

from ..base import ALL_SIGNALS, ModelInfo, Pruner, Stage, TokenState
from ..flops import DecoderShape
from ..ops import compact_index
from ..report import EfficiencyReport, SampleRecord, Stopwatch, Timer, VisionShape
from .capture import ProjectionCapture
from .decoder import DecodeCache, DecoderRunner, LayerSlots, Sequence
from .vision import VisionProbe, VisionRunner

UNSUPPORTED_KWARGS = ("output_attentions", "output_hidden_states")


def keep_pixels_for_forward(core) -> None:
    """generate() pre-encodes images through `get_image_features` when its signature names
    pixel_values; a pass-through with a (*args, **kwargs) signature keeps the pixels in the call to
    forward, where the pruned vision loop runs. Direct calls behave as before. Undone by deleting
    the instance attribute."""
    original = core.get_image_features

    def get_image_features(*args, **kwargs):
        return original(*args, **kwargs)

    core.get_image_features = get_image_features


def model_info(model) -> ModelInfo:
    cfg = model.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    side = vcfg.image_size // vcfg.patch_size
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={cfg.vision_feature_layer!r}: only a single int layer is supported")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: "
                         "allowed 'default' or 'full'")
    feature = cfg.vision_feature_layer % (vcfg.num_hidden_layers + 1)
    extra = 1 if cfg.vision_feature_select_strategy == "full" else 0
    return ModelInfo(family="llava", visual_tokens=side * side + extra, grid=(side, side),
                     vision_layers=vcfg.num_hidden_layers, vision_feature_layer=feature,
                     llm_layers=tcfg.num_hidden_layers, has_cls=True, llm_width=tcfg.hidden_size)


class LlavaRuntime:
    provides = ALL_SIGNALS  # CLS, every vision layer, attention and features at every stage (pruners.base.SIGNALS)

    def __init__(self, model, pruner: Pruner) -> None:
        self.model = model
        self.core = model.model
        self.pruner = pruner
        self.info = self._model_info(model)
        pruner.setup(self.info)
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.full_strategy = cfg.vision_feature_select_strategy == "full"
        self.capture = ProjectionCapture()
        self.clock = Stopwatch()
        self.vision = VisionRunner(self.core.vision_tower, pruner, self.capture, self.info.vision_feature_layer,
                                   self.info.grid, self.clock)
        self.decoder = DecoderRunner(self.core.language_model, pruner, self.capture, self.clock)
        proj = self.core.multi_modal_projector
        self.report = EfficiencyReport(
            pruner.name, DecoderShape.from_config(cfg.text_config),
            VisionShape(cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size,
                        proj.linear_1.in_features, proj.linear_1.out_features),
        )
        self._gen: dict | None = None  # bookkeeping of the generation in progress
        self._question: dict | None = None  # the prompt's text for VISION_OUTPUT hooks (signal "question")

    @staticmethod
    def _model_info(model) -> ModelInfo:
        return model_info(model)

    # -- attach / detach ----------------------------------------------------------------------
    def __enter__(self) -> EfficiencyReport:
        for i in self.vision.hook_layers:
            self.capture.watch(self.vision.layers[i].self_attn)
        for i in self.decoder.hook_layers:
            self.capture.watch(self.decoder.layers[i].self_attn)
        self.core.forward = self.forward
        keep_pixels_for_forward(self.core)
        return self.report

    def __exit__(self, *exc) -> None:
        del self.core.forward
        del self.core.get_image_features
        self.capture.remove()
        self._gen = None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs) -> LlavaModelOutputWithPast:
        for key in UNSUPPORTED_KWARGS:
            if kwargs.get(key):
                raise ValueError(f"{key}=True is not supported while a pruner is attached")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pre-encoded mm_encoder_outputs cannot be pruned; pass pixel_values while attached")
        if input_ids is None:
            raise ValueError("an attached model needs input_ids (to find the image tokens), not inputs_embeds")
        lm = self.core.language_model
        use_cache = lm.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return self._decode(input_ids, position_ids, past_key_values)
        if past_key_values is None and use_cache:
            past_key_values = DynamicCache(config=lm.config)
        return self._prefill(input_ids, pixel_values, attention_mask, position_ids, past_key_values)

    def _prefill(self, input_ids, pixel_values, attention_mask, position_ids, cache) -> LlavaModelOutputWithPast:
        device = input_ids.device
        bsz, length = input_ids.shape
        with Timer(device) as timer:
            embeds = self.core.get_input_embeddings()(input_ids)
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError("an attached model takes a 2-D attention_mask (batch, length)")
            positions = position_ids if position_ids is not None else torch.arange(length, device=device)
            positions = positions.expand(bsz, length)
            image_mask = input_ids == self.image_token_id
            seq, vision_counts, proj_tokens = self._sequence(embeds, valid, positions, image_mask, pixel_values)
            hidden, final, slots, counts = self.decoder.prefill(seq, cache, self.info.grid)
            out = self._to_input_slots(hidden, final, length)
        self._gen = {"cache": cache, "slots": slots, "length": length, "step": 0,
                     "shift": valid.sum(-1) - final.valid.sum(-1) if self.pruner.renumber_positions else None}
        records = self._records(vision_counts, proj_tokens, counts, image_mask)
        self.report.add_prefill(records, timer.ms, self.clock.take())
        if cache is not None:
            self.report.update_kv(self._kv_bytes(cache, slots), prefill=True)
        return LlavaModelOutputWithPast(last_hidden_state=out, past_key_values=cache)

    @staticmethod
    def _to_input_slots(hidden: Tensor, final: Sequence, length: int) -> Tensor:
        """The decoder's outputs scattered back to the input's `length` slots (dropped slots hold zeros),
        so logits line up with `input_ids` as usual."""
        out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
        src = final.origin.clamp(min=0)[..., None].expand_as(hidden)
        return out.scatter(1, src, hidden * final.valid[..., None])

    def _generation(self, cache) -> dict:
        """The bookkeeping of the generation whose prefill filled `cache`."""
        if self._gen is None or self._gen["cache"] is not cache:
            raise ValueError("this KV cache was not filled by the attached model; run the prefill inside attach")
        return self._gen

    def _decode(self, input_ids, position_ids, cache) -> LlavaModelOutputWithPast:
        gen = self._generation(cache)
        device = input_ids.device
        bsz, q = input_ids.shape
        with Timer(device) as timer:
            if Stage.DECODE in self.pruner.stages:
                self.pruner.decode(DecodeCache(cache, gen["slots"], gen["step"]))  # inside the step's timer
            origin = (gen["length"] + torch.arange(q, device=device)).expand(bsz, q)
            if position_ids is None:
                position_ids = origin  # HF's default: past length + arange, in input coordinates
            if gen["shift"] is not None:
                position_ids = position_ids - gen["shift"][:, None]
            embeds = self.core.get_input_embeddings()(input_ids)
            hidden = self.decoder.decode(embeds, position_ids.expand(bsz, q), origin, cache, gen["slots"])
        gen["length"] += q
        gen["step"] += q
        self.report.add_decode_step(timer.ms / q)
        self.report.update_kv(self._kv_bytes(cache, gen["slots"]), prefill=False)
        return LlavaModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    # -- vision -> sequence -------------------------------------------------------------------
    def _sequence(self, embeds, valid, positions, image_mask, pixel_values):
        """The decoder's input sequence, with the (pruned) image tokens in their image slots."""
        n_img_tokens = int(image_mask.sum())
        visual = self.info.visual_tokens
        if pixel_values is None or n_img_tokens == 0:
            if n_img_tokens:
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            num_images = torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)
            return self._compact(embeds, valid, positions, image_mask, num_images), [], 0
        if n_img_tokens != pixel_values.shape[0] * visual:
            raise ValueError(f"input_ids hold {n_img_tokens} image tokens for {pixel_values.shape[0]} image(s); "
                             f"this model expects {visual} per image")
        slots = image_mask.flatten().nonzero()[:, 0].view(-1, visual)  # (images, visual) flat (b * L + l)
        sample = slots[:, 0] // image_mask.shape[1]
        self._question = {"text_embeds": embeds, "text_valid": valid & ~image_mask, "text_row": sample}
        try:
            state, vision_counts = self._encode(pixel_values.to(self.core.vision_tower.dtype))
        finally:
            self._question = None
        proj_tokens = state.valid.sum(-1)
        kept = state.valid
        slot_of = (state.positions + int(self.full_strategy)).clamp(min=0)  # image slot each token stands for
        target = torch.gather(slots, 1, slot_of)[kept]
        num_images = torch.bincount(sample, minlength=embeds.shape[0])
        protected = None if state.protected is None else state.protected[kept]
        seq = self._merge(embeds, valid, positions, image_mask, image_mask, target, state.hidden[kept], num_images,
                          protected)
        return seq, [self._per_sample(c, sample, embeds.shape[0]) for c in vision_counts], \
            self._per_sample(proj_tokens, sample, embeds.shape[0])

    def _merge(self, embeds, valid, positions, image_mask, visual_mask, target, values, num_images,
               protected=None) -> Sequence:
        """The decoder input: the text, and `values` written at the flat slots `target` (b * L + l); image
        slots (`image_mask`) not in `target` are left out. `visual_mask` marks the slots of visual tokens;
        `protected` (one flag per target) follows its token into the sequence."""
        flat = embeds.reshape(-1, embeds.shape[-1]).clone()
        flat[target] = values.to(flat.dtype)
        keep = (valid & ~image_mask).flatten().index_fill(0, target, True).view_as(valid)
        seq = self._compact(flat.view_as(embeds), keep, positions, visual_mask, num_images)
        if protected is not None:
            flags = torch.zeros(keep.numel(), dtype=torch.bool, device=keep.device)
            flags[target] = protected
            seq.protected = flags.view_as(keep).gather(1, seq.origin.clamp(min=0)) & seq.valid
        return seq

    def _encode(self, pixel_values: Tensor) -> tuple[TokenState, list[Tensor]]:
        """Vision loop, CLS handling, projector and the VISION_OUTPUT hook."""
        features, counts = self.vision.run(pixel_values)
        # 'default' drops CLS; 'full' feeds it as the first image token (image slot 0).
        patches = features.keep(compact_index(features.valid & (features.visual | self.full_strategy)))
        return self._vision_output(features, patches.replace(visual=patches.valid)), counts

    def _vision_output(self, features: TokenState, patches: TokenState) -> TokenState:
        """Projector and the VISION_OUTPUT hook on the feature tokens chosen for the LLM (`patches`)."""
        hidden = self.core.multi_modal_projector(patches.hidden)
        state = patches.replace(hidden=hidden, stage=Stage.VISION_OUTPUT)
        if Stage.VISION_OUTPUT in self.pruner.stages:
            layer = self.vision.layers[self.info.vision_feature_layer] \
                if self.info.vision_feature_layer < len(self.vision.layers) else None
            if layer is not None:
                state.extras["vision_hidden"] = features.hidden
                state.extras["vision_attention"] = _LazyVisionProbe(layer, features)
            # Methods that merge CLIP features (PruMerge) project their result themselves.
            state.extras["projector"] = self.core.multi_modal_projector
            state.extras.update(self._question or {})  # the prompt's text (signal "question"; LLaVA-1.5 only)
            state = self.clock.run(self.pruner.vision_output, state)
        return state

    @staticmethod
    def _per_sample(per_image: Tensor, sample: Tensor, bsz: int) -> Tensor:
        """Per-image counts (..., images) summed per sample (..., bsz)."""
        out = torch.zeros(*per_image.shape[:-1], bsz, dtype=per_image.dtype, device=per_image.device)
        return out.index_add(-1, sample, per_image)

    @staticmethod
    def _compact(embeds, keep, positions, image_mask, num_images) -> Sequence:
        index = compact_index(keep)
        pad, safe = index < 0, index.clamp(min=0)
        hidden = torch.gather(embeds, 1, safe[..., None].expand(-1, -1, embeds.shape[-1]))
        return Sequence(
            hidden=hidden.masked_fill(pad[..., None], 0.0), valid=~pad,
            visual=image_mask.gather(1, safe) & ~pad, positions=positions.gather(1, safe).masked_fill(pad, 0),
            origin=index, num_images=num_images,
        )

    # -- report -------------------------------------------------------------------------------
    def _records(self, vision_counts, proj_tokens, counts, image_mask) -> list[SampleRecord]:
        llm = torch.stack(counts).tolist()  # (layers, 3, B): tokens, visual tokens, tokens the MLP saw
        vision = torch.stack(vision_counts).permute(2, 1, 0).tolist() if vision_counts else None  # (B, 2, layers)
        proj = proj_tokens.tolist() if torch.is_tensor(proj_tokens) else [0] * image_mask.shape[0]
        return [
            SampleRecord(
                vision_tokens=vision[b][0] if vision else [], vision_mlp_tokens=vision[b][1] if vision else [],
                projector_tokens=proj[b], llm_tokens=[layer[0][b] for layer in llm],
                llm_visual=[layer[1][b] for layer in llm], llm_mlp_tokens=[layer[2][b] for layer in llm],
            )
            for b in range(image_mask.shape[0])
        ]

    @staticmethod
    def _kv_bytes(cache, slots: list[LayerSlots]) -> list[list[int]]:
        """Bytes of real K and V entries per sample and layer, read off the cache tensors."""
        per_layer = []
        for cl, s in zip(cache.layers, slots):
            k = cl.keys
            entry = 2 * k.shape[1] * k.shape[3] * k.element_size()
            per_layer.append((s.valid.sum(-1) * entry).tolist())
        return [list(x) for x in zip(*per_layer)]


class _LazyVisionProbe:
    """Attention of the vision layer whose input are the features (computed only if asked)."""

    def __init__(self, layer, features: TokenState) -> None:
        self.layer, self.features, self.probe = layer, features, None

    def _built(self) -> VisionProbe:
        if self.probe is None:
            self.probe = VisionProbe.from_input(self.layer, self.features.hidden, self.features.valid)
        return self.probe

    def __call__(self, query_index: Tensor, heads: str = "mean", logits: bool = False) -> Tensor:
        return self._built()(query_index, heads=heads, logits=logits)

    def keys(self) -> Tensor:
        """(B, heads, N, head_dim) keys of the layer, on the feature slots (CLS included)."""
        return self._built().key
