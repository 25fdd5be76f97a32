"""The efficiency report that `pruners.attach` returns: token counts, FLOPs, KV cache, timings.

The runtime records, per sample, the tokens each layer processed and the KV cache it left;
`as_dict()` turns them into means over every sample seen inside the `with` block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import fmean

import torch

from . import flops


@dataclass
class SampleRecord:
    """What one sample cost in one prefill (and the decode steps after it)."""

    vision_tokens: list[int]  # tokens per vision layer run, summed over the sample's images
    projector_tokens: int  # tokens entering the projector
    llm_tokens: list[int]  # tokens (text + visual) per LLM layer
    llm_visual: list[int]  # visual tokens per LLM layer
    llm_mlp_tokens: list[int] = field(default_factory=list)  # tokens each layer's MLP saw (fewer after a mid cut)
    vision_mlp_tokens: list[int] = field(default_factory=list)  # likewise per vision layer
    # Per vision layer, the sum over the sample's separate encoder passes (images, LLaVA-NeXT's views) of n^2,
    # the attention's query-key pairs; empty: one pass, (vision_tokens)^2.
    vision_attention_pairs: list[int] = field(default_factory=list)
    kv_bytes_prefill: int = 0
    kv_bytes: int = 0  # after the last forward seen (prefill or decode step)
    kv_bytes_per_layer: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class VisionShape:
    hidden: int
    mlp: int
    projector_in: int
    projector_out: int
    mlp_matrices: int = 2  # 2: fc1, fc2 (CLIP, Qwen2-VL); 3: SwiGLU gate, up, down (Qwen2.5-VL)
    projector_hidden: int | None = None  # projector in -> hidden -> out; None: hidden = out (LLaVA's MLP)


class EfficiencyReport:
    """Accumulates what the attached model did; `as_dict()` summarises it."""

    def __init__(self, pruner_name: str, decoder: flops.DecoderShape, vision: VisionShape) -> None:
        self.pruner_name = pruner_name
        self.decoder = decoder
        self.vision = vision
        self.reset()

    def reset(self) -> None:
        self.samples: list[SampleRecord] = []
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.pruner_ms: list[float] = []  # per prefill: time inside pruner hooks
        self._live: list[SampleRecord] = []  # samples of the generation in progress

    # -- recording (called by the runtime) ---------------------------------------------------
    def add_prefill(self, records: list[SampleRecord], ms: float, pruner_ms: float = 0.0) -> None:
        self.samples.extend(records)
        self._live = records
        self.prefill_ms.append(ms)
        self.pruner_ms.append(pruner_ms)

    def add_decode_step(self, ms: float) -> None:
        self.decode_ms.append(ms)

    def update_kv(self, per_sample_layers: list[list[int]], prefill: bool) -> None:
        """Record KV bytes per sample and layer of the generation in progress."""
        for rec, layers in zip(self._live, per_sample_layers):
            rec.kv_bytes = sum(layers)
            if prefill:
                rec.kv_bytes_prefill = rec.kv_bytes
                rec.kv_bytes_per_layer = layers

    # -- summary -------------------------------------------------------------------------------
    def _llm_flops(self, rec: SampleRecord, fn) -> int:
        mlp = rec.llm_mlp_tokens or rec.llm_tokens
        return sum(fn(n, self.decoder, n_mlp) for n, n_mlp in zip(rec.llm_tokens, mlp))

    def _vision_flops(self, rec: SampleRecord) -> int:
        v = self.vision
        mlp = rec.vision_mlp_tokens or rec.vision_tokens
        pairs = rec.vision_attention_pairs or [None] * len(rec.vision_tokens)
        encoder = sum(
            flops.vit_layer_macs(n, v.hidden, v.mlp, n_mlp, v.mlp_matrices, p)
            for n, n_mlp, p in zip(rec.vision_tokens, mlp, pairs)
        )
        inner = v.projector_hidden or v.projector_out
        projector = rec.projector_tokens * (v.projector_in * inner + inner * v.projector_out)
        return encoder + projector

    def as_dict(self) -> dict:
        """Means over all samples seen. Token counts per sample; FLOPs are multiply-adds."""
        s = self.samples
        if not s:
            return {"pruner": self.pruner_name, "num_samples": 0}
        layers = len(s[0].llm_tokens)
        per_layer = [fmean(r.llm_visual[i] for r in s) for i in range(layers)]
        vision_layers = max(len(r.vision_tokens) for r in s)
        return {
            "pruner": self.pruner_name,
            "num_samples": len(s),
            "visual_tokens": fmean(r.llm_visual[-1] for r in s),
            "visual_tokens_llm_input": fmean(r.llm_visual[0] for r in s),
            "visual_tokens_layer_mean": fmean(fmean(r.llm_visual) for r in s),
            "visual_tokens_per_layer": per_layer,
            "vision_tokens_per_layer": [
                fmean(r.vision_tokens[i] for r in s if i < len(r.vision_tokens)) for i in range(vision_layers)
            ],
            "prefill_flops": fmean(self._llm_flops(r, flops.llama_layer_macs) for r in s),
            "prefill_flops_fastv": fmean(self._llm_flops(r, flops.fastv_layer_macs) for r in s),
            "vision_flops": fmean(self._vision_flops(r) for r in s),
            "flops_convention": flops.CONVENTION,
            "kv_cache_bytes": fmean(r.kv_bytes for r in s),
            "kv_cache_bytes_prefill": fmean(r.kv_bytes_prefill for r in s),
            "kv_cache_bytes_per_layer": [
                fmean(r.kv_bytes_per_layer[i] for r in s) for i in range(len(s[0].kv_bytes_per_layer))
            ],
            "prefill_latency_ms": fmean(self.prefill_ms) if self.prefill_ms else 0.0,
            "pruner_latency_ms": fmean(self.pruner_ms) if self.pruner_ms else 0.0,
            "decode_latency_ms_per_token": fmean(self.decode_ms) if self.decode_ms else 0.0,
            "num_prefills": len(self.prefill_ms),
        }


class Stopwatch:
    """Accumulates the time spent in pruner hooks (scoring, matching, merging)."""

    def __init__(self) -> None:
        self.ms = 0.0

    def run(self, fn, *args):
        device = args[0].hidden.device if hasattr(args[0], "hidden") else torch.device("cpu")
        with Timer(device) as t:
            out = fn(*args)
        self.ms += t.ms
        return out

    def take(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms


class Timer:
    """Wall-clock milliseconds of a block, synchronising CUDA so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = 0.0

    def __enter__(self) -> Timer:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.ms = (time.perf_counter() - self._t0) * 1e3

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
