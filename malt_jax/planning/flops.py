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
* An RL iteration (``malt-jax rl``, :func:`rl_iteration_flops`): the rollout
  (:func:`rollout_flops`: each level's parent contexts re-encoded with the role's adapter at the
  full cache width and every node's sampled tokens, each attending the whole cache, as the
  compiled sampler does) and, per trained role, ``rl.updates_per_iteration`` policy-gradient updates
  (:func:`pg_update_flops`) plus the reference (and, with several updates, behaviour) log-prob
  forwards (:func:`scoring_flops`). These score only the ``C`` completion positions of a row at
  the LM head (``pg_step`` gathers them first), so the head counts ``C``, not ``T``, per row.
"""

from __future__ import annotations

import math
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
    "pg_update_flops",
    "scoring_flops",
    "rollout_flops",
    "rl_row_shapes",
    "rl_iteration_flops",
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


def pg_update_flops(
    m: ModelConfig, rank: int, targets: Sequence[str], top_layers: int, rows: int, T: int, C: int
) -> float:
    """One policy-gradient update (forward + backward) of ``rows`` rows of ``T`` tokens, ``C``
    scored at the LM head per row, every token attending the full ``T x T`` square."""
    L = m.n_layers
    k = top_layers or L
    tokens, scored, pairs = rows * T, rows * C, rows * T * T
    head, per_layer = m.vocab_size * m.dim, layer_matmul_params(m)
    fwd = 2 * L * per_layer * tokens + 2 * head * scored + attention_flops(m, pairs, L)
    bwd = 2 * k * per_layer * tokens + 2 * head * scored + 2 * attention_flops(m, pairs, k)
    return float(fwd + bwd + 6 * lora_params(m, rank, targets, k) * tokens)


def scoring_flops(m: ModelConfig, lora: int, rows: int, T: int, C: int) -> float:
    """A gradient-free log-prob pass (``pg_step.completion_logps``) of ``rows`` rows of ``T``
    tokens, ``C`` scored per row, with an adapter of ``lora`` parameters (0: the base model)."""
    tokens = rows * T
    return float(
        2 * (m.n_layers * layer_matmul_params(m) + lora) * tokens
        + 2 * m.vocab_size * m.dim * rows * C
        + attention_flops(m, rows * T * T)
    )


def rollout_flops(cfg: RunConfig, questions: int, prompt_tokens: int, turn_tokens: int) -> tuple[float, float]:
    """``(FLOPs, tokens)`` of sampling the G -> V -> R trees of ``questions`` questions with one
    adapter per role, as ``expand`` computes it. Chat framing: each level first encodes its
    parents' contexts with its adapter (mode "fork"; every row's in "naive", without
    ``tree.share_prefix``), rows of the full cache width ``S = prompt + budgets + 2 turns``
    attending ``S`` + the level's cache slots; separate framing: each question's prompt and each
    parent's turn once. Then every node's budget of new tokens (``sampling.budgets``) is decoded,
    each attending the level's cache slots. The LM head runs once per encoded row and per decoded
    token. ``tokens``: the tokens encoded and decoded."""
    m, tr = cfg.model, cfg.tree
    budgets = cfg.sampling.budgets()
    sizes = [prompt_tokens + sum(budgets[: i + 1]) + i * turn_tokens for i in range(3)]
    S = sizes[-1]
    rows = (questions, questions * tr.n, questions * tr.n * tr.m, questions * tr.n * tr.m * tr.l)
    if cfg.task.framing == "chat":
        encoders = rows[:3] if tr.share_prefix else rows[1:]
        encoded = float(sum(encoders) * S)
        enc_pairs = float(sum(r * S * (sizes[i] + S) for i, r in enumerate(encoders)))
        heads = float(sum(encoders))
    else:
        encoded = float(questions * prompt_tokens + (rows[1] + rows[2]) * turn_tokens)
        enc_pairs, heads = encoded * S, float(rows[0] + rows[1] + rows[2])
    new = float(sum(rows[i + 1] * budgets[i] for i in range(3)))
    pairs = enc_pairs + sum(rows[i + 1] * budgets[i] * sizes[i] for i in range(3))
    n_lora = lora_params(m, cfg.lora.rank, cfg.lora.targets, cfg.lora.top_layers or m.n_layers)
    tokens = encoded + new
    body = 2 * (m.n_layers * layer_matmul_params(m) + n_lora) * tokens
    return float(body + 2 * m.vocab_size * m.dim * (heads + new) + attention_flops(m, pairs)), tokens


def _bucket(n: int, max_len: int) -> int:
    from malt_jax.training.data import bucket_length

    return bucket_length(n, max_len)


def rl_row_shapes(cfg: RunConfig, prompt_tokens: int, turn_tokens: int) -> dict[str, tuple[int, int, int]]:
    """Per role ``(rows, T, C)`` of an RL iteration's update batch: the role's nodes over
    ``rl.questions_per_iteration`` questions padded to a multiple of ``rl.micro_batch``; ``T`` the
    padded length of its longest row (context + completion, ``data.bucket_length``, at most
    ``train.max_seq_len``); ``C`` the scored width (``data.completion_index``: the budget plus
    the end-of-turn token, rounded up to a power of two >= 8, at most ``T``)."""
    tr, rl = cfg.tree, cfg.rl
    Tmax = cfg.train.max_seq_len
    budgets = cfg.sampling.budgets()
    Q, micro = rl.questions_per_iteration, rl.micro_batch
    nodes = (Q * tr.n, Q * tr.n * tr.m, Q * tr.n * tr.m * tr.l)
    out = {}
    context = prompt_tokens
    for i, role in enumerate(("G", "V", "R")):
        if i:
            context += budgets[i - 1] + turn_tokens
        T = _bucket(context + budgets[i], Tmax)
        C = min(T, max(8, 1 << max(0, math.ceil(math.log2(budgets[i] + 1)))))
        out[role] = (-(-nodes[i] // micro) * micro, T, C)
    return out


def rl_iteration_flops(cfg: RunConfig, prompt_tokens: int, turn_tokens: int) -> dict[str, float]:
    """FLOPs of one RL iteration (see the module docstring): ``rollout``, ``update`` (every
    trained role's updates and log-prob passes) and their ``tokens``."""
    m, lo, rl = cfg.model, cfg.lora, cfg.rl
    n_lora = lora_params(m, lo.rank, lo.targets, lo.top_layers or m.n_layers)
    rollout, tokens = rollout_flops(cfg, rl.questions_per_iteration, prompt_tokens, turn_tokens)
    update, update_tokens = 0.0, 0.0
    for role, (rows, T, C) in rl_row_shapes(cfg, prompt_tokens, turn_tokens).items():
        if role not in rl.roles:
            continue
        update += rl.updates_per_iteration * pg_update_flops(m, lo.rank, lo.targets, lo.top_layers, rows, T, C)
        update += scoring_flops(m, n_lora if rl.reference == "sft" else 0, rows, T, C)  # the reference
        if rl.updates_per_iteration > 1:  # the behaviour policy's log-probs
            update += scoring_flops(m, n_lora, rows, T, C)
        update_tokens += rows * T
    return {
        "rollout": rollout,
        "rollout_tokens": tokens,
        "update": update,
        "update_tokens": update_tokens,
        "iteration": rollout + update,
    }
