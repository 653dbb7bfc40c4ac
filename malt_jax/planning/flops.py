"""FLOP counts of the decoder: the one set of formulas that ``plan.py`` and ``bench/`` use
(the count of stored parameters is ``ModelConfig.n_params``).

Conventions:

* :func:`matmul_params`: the weights one token meets in matrix products: every layer's
  projections and the LM head (counted also when tied; the embedding lookup, norms and biases
  are not matmuls).
* FLOPs count 2 per multiply-add. A token's forward pass costs ``2 * matmul_params``; attention
  (``Q K^T`` and ``P V``) costs ``4 * H * hd`` per (query, key) pair and layer. Which pairs count
  is the caller's choice: the planner counts the full ``T x T`` square (the compiled step masks
  the upper triangle, it does not skip it), the benchmarks count each token's real causal
  context (``t (t + 1) / 2`` pairs for a row of ``t`` real tokens, padding excluded: the usual
  "model FLOPs" of MFU).
* A LoRA train step (:func:`lora_train_flops`): forward through every layer; backward only
  through the LM head and the adapted layers (``lora.top_layers``; all when 0), and there only
  input gradients of the frozen weights (``2 * matmul`` per token, attention twice its forward);
  the adapter's own matmuls ``6 * lora_params`` per token (forward, input and weight gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from malt_jax.config import ModelConfig, RunConfig

__all__ = [
    "layer_matmul_params",
    "matmul_params",
    "lora_params",
    "attention_flops",
    "forward_flops",
    "lora_train_flops",
    "analytic_step_flops",
]


def layer_matmul_params(m: ModelConfig) -> int:
    """Matrix parameters of one decoder layer (q, k, v, o and the three MLP matrices)."""
    return m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.dim * m.hidden_dim


def matmul_params(m: ModelConfig) -> int:
    """Matmul weights per token: every layer's matrices plus the LM head."""
    return m.n_layers * layer_matmul_params(m) + m.vocab_size * m.dim


def _target_dims(m: ModelConfig) -> dict[str, tuple[int, int]]:
    D, H, K, hd, F = m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.hidden_dim
    return {
        "wq": (D, H * hd),
        "wk": (D, K * hd),
        "wv": (D, K * hd),
        "wo": (H * hd, D),
        "w_gate": (D, F),
        "w_up": (D, F),
        "w_down": (F, D),
    }


def lora_params(m: ModelConfig, rank: int, targets: Sequence[str], layers: int | None = None) -> int:
    """Parameters of a LoRA adapter: ``rank * (in + out)`` per target weight and adapted layer
    (``layers``, default all)."""
    dims = _target_dims(m)
    layers = m.n_layers if layers is None else layers
    return layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def attention_flops(m: ModelConfig, pairs: float, layers: int | None = None) -> float:
    """Forward attention FLOPs of ``pairs`` (query, key) pairs in each of ``layers`` layers
    (default all)."""
    layers = m.n_layers if layers is None else layers
    return 4 * m.n_heads * m.head_dim * layers * pairs


def forward_flops(m: ModelConfig, tokens: float, pairs: float, lora: int = 0) -> float:
    """Forward pass of ``tokens`` tokens attending ``pairs`` (query, key) pairs per layer, with an
    adapter of ``lora`` parameters applied."""
    return 2 * (matmul_params(m) + lora) * tokens + attention_flops(m, pairs)


def lora_train_flops(
    m: ModelConfig, rank: int, targets: Sequence[str], top_layers: int, tokens: float, pairs: float
) -> float:
    """One LoRA train step over ``tokens`` tokens attending ``pairs`` (query, key) pairs per layer
    (see the module docstring); ``top_layers`` adapted layers (0 = all)."""
    L = m.n_layers
    k = top_layers or L
    head, per_layer = m.vocab_size * m.dim, layer_matmul_params(m)
    fwd = 2 * (L * per_layer + head) * tokens + attention_flops(m, pairs, L)
    bwd = 2 * (k * per_layer + head) * tokens + 2 * attention_flops(m, pairs, k)
    return float(fwd + bwd + 6 * lora_params(m, rank, targets, k) * tokens)


def analytic_step_flops(cfg: RunConfig, rows: int) -> float:
    """The planner's FLOPs of one train step on ``rows`` rows of ``train.max_seq_len`` tokens, every
    token attending the full ``T x T`` square (what the compiled step computes)."""
    T = cfg.train.max_seq_len
    tokens = rows * T
    return lora_train_flops(cfg.model, cfg.lora.rank, cfg.lora.targets, cfg.lora.top_layers, tokens, tokens * T)
