"""Analytic prefill cost, counted per layer from the tokens present at that layer.

Counts are multiply-adds (one multiply plus one add = 1), the unit the token-pruning papers
print as "FLOPs". Attention is counted over the full n x n score matrix (no causal halving),
as the papers do. Norms, activations, softmax and rotary embeddings are not counted.

LLaMA decoder layer of n tokens, width d, attention width a = heads * head_dim, K/V width
c = kv_heads * head_dim, SwiGLU width m:
    q, o projections   2 n d a
    k, v projections   2 n d c          (grouped-query attention counted exactly)
    scores and mixing  2 n^2 a
    MLP                3 n d m          (gate, up, down)
which is 4nd^2 + 2n^2d + 3ndm when a = c = d. FastV printed 2ndm for the MLP and ignores GQA;
`fastv_layer_macs` gives that figure so numbers compare with the papers.

CLIP encoder layer: 4nd^2 + 2n^2d + 2ndm (fc1, fc2); 3ndm for a SwiGLU MLP (Qwen2.5-VL's encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

CONVENTION = (
    "multiply-adds; LLaMA layer = 2nda + 2ndc + 2n^2a + 3ndm (a: attention width, c: K/V width, "
    "m: SwiGLU width; = 4nd^2 + 2n^2d + 3ndm without GQA), full n^2 attention; "
    "prefill_flops_fastv uses FastV's 4nd^2 + 2n^2d + 2ndm"
)


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    attn: int  # num_heads * head_dim
    kv: int  # num_kv_heads * head_dim
    mlp: int

    @classmethod
    def from_config(cls, cfg) -> DecoderShape:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.num_attention_heads * head_dim, kv_heads * head_dim, cfg.intermediate_size)


def llama_layer_macs(n: int, s: DecoderShape, n_mlp: int | None = None) -> int:
    """Multiply-adds of one LLaMA decoder layer on n tokens (exact for GQA). `n_mlp`: the tokens its
    MLP sees when a pruner cuts between attention and MLP (default n)."""
    n_mlp = n if n_mlp is None else n_mlp
    return 2 * n * s.hidden * s.attn + 2 * n * s.hidden * s.kv + 2 * n * n * s.attn + 3 * n_mlp * s.hidden * s.mlp


def fastv_layer_macs(n: int, s: DecoderShape, n_mlp: int | None = None) -> int:
    """FastV's printed per-layer count 4nd^2 + 2n^2d + 2ndm (no GQA, two-matrix MLP)."""
    d, n_mlp = s.hidden, n if n_mlp is None else n_mlp
    return 4 * n * d * d + 2 * n * n * d + 2 * n_mlp * d * s.mlp


def vit_layer_macs(
    n: int, d: int, m: int, n_mlp: int | None = None, mlp_matrices: int = 2, pairs: int | None = None
) -> int:
    """Multiply-adds of one pre-norm ViT (CLIP) encoder layer on n tokens (`n_mlp`: as in `llama_layer_macs`;
    `mlp_matrices`: 2 for fc1/fc2, 3 for a SwiGLU MLP as in Qwen2.5-VL's encoder). `pairs`: the query-key
    pairs of the attention when the n tokens attend in separate groups (sum of n_g^2 over LLaVA-NeXT's views);
    default n^2, one group."""
    pairs = n * n if pairs is None else pairs
    return 4 * n * d * d + 2 * pairs * d + mlp_matrices * (n if n_mlp is None else n_mlp) * d * m
