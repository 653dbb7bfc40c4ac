"""An independent, straightforward NumPy Llama forward pass (HF layout, one token at a time
semantics via a full causal mask) used as the numerical reference in tests. Qwen2's q/k/v
biases and Qwen3's q/k head norms are applied when their tensors are present."""

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    # x: [T, heads, hd] rotate-half convention
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_logits(hf: dict, cfg, tokens: np.ndarray) -> np.ndarray:
    """hf: HF-style tensors (float64 numpy, [out, in] linears); tokens: [T]. Returns [T, V]."""
    T = len(tokens)
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = hf["model.embed_tokens.weight"][tokens].astype(np.float64)
    pos = np.arange(T, dtype=np.float64)
    for i in range(cfg.n_layers):

        def p(n: str, i: int = i) -> np.ndarray:
            return hf[f"model.layers.{i}.{n}"]

        def bias(n: str, i: int = i) -> np.ndarray | float:  # Qwen2
            return hf.get(f"model.layers.{i}.self_attn.{n}_proj.bias", 0.0)

        h = _rms(x, p("input_layernorm.weight"), cfg.norm_eps)
        q = (h @ p("self_attn.q_proj.weight").T + bias("q")).reshape(T, H, hd)
        k = (h @ p("self_attn.k_proj.weight").T + bias("k")).reshape(T, K, hd)
        v = (h @ p("self_attn.v_proj.weight").T + bias("v")).reshape(T, K, hd)
        if f"model.layers.{i}.self_attn.q_norm.weight" in hf:  # Qwen3: RMSNorm of every q / k head
            q = _rms(q, p("self_attn.q_norm.weight"), cfg.norm_eps)
            k = _rms(k, p("self_attn.k_norm.weight"), cfg.norm_eps)
        q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
        out = np.zeros((T, H, hd))
        for head in range(H):
            kv = head // (H // K)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, head] = s @ v[:, kv]
        x = x + out.reshape(T, H * hd) @ p("self_attn.o_proj.weight").T
        h = _rms(x, p("post_attention_layernorm.weight"), cfg.norm_eps)
        g = h @ p("mlp.gate_proj.weight").T
        u = h @ p("mlp.up_proj.weight").T
        x = x + ((g / (1 + np.exp(-g))) * u) @ p("mlp.down_proj.weight").T
    x = _rms(x, hf["model.norm.weight"], cfg.norm_eps)
    head = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return x @ head.T
