"""Capture of a layer's query and key projections, so attention probes cost no extra matmul.

Forward hooks on `q_proj` / `k_proj` of the attention modules a pruner needs keep the last
outputs. The model's attention itself runs unchanged (SDPA, FlashAttention); a probe rebuilds
only the attention rows a pruner asks for from these projections.
"""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionCapture:
    def __init__(self) -> None:
        self._handles = []
        self._store: dict[int, dict[str, Tensor]] = {}

    def watch(self, attn: nn.Module) -> None:
        """Start capturing `attn.q_proj` and `attn.k_proj` outputs."""
        for name in ("q_proj", "k_proj"):
            self._handles.append(getattr(attn, name).register_forward_hook(self._hook(id(attn), name)))

    def _hook(self, key: int, name: str):
        def hook(module, args, output):
            self._store.setdefault(key, {})[name] = output

        return hook

    def get(self, attn: nn.Module) -> tuple[Tensor, Tensor]:
        """(queries, keys) of the last forward of `attn`, each (B, n, heads * head_dim)."""
        got = self._store.get(id(attn), {})
        if "q_proj" not in got or "k_proj" not in got:
            raise RuntimeError("no captured projections for this layer: the runtime did not watch it")
        return got["q_proj"], got["k_proj"]

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()
