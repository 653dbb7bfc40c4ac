"""LoRA adapters: identity init, merge == on-the-fly, merged export to HF safetensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import LoraConfig, ModelConfig
from malt_jax.model.llama import causal_positions, forward, init_params
from malt_jax.model.lora import adapter_shapes, count_params, init_lora, lora_scale, merge
from malt_jax.model.weights import load_hf, save_hf

CFG = ModelConfig.tiny(tie_embeddings=False)
LORA = LoraConfig(rank=4, alpha=8.0)


fwd = jax.jit(forward, static_argnums=3)


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    return params, tokens, causal_positions(2, 12)


def _random_adapter(key):
    """An adapter with non-zero b (a trained-looking one)."""
    ad = init_lora(CFG, LORA, key)
    noise = jax.random.normal(key, (CFG.n_layers, LORA.rank, CFG.hidden_dim))
    return jax.tree.map(lambda x: x if x.any() else 0.05 * noise[:, :, :x.shape[2]], ad)


def test_shapes_scale_and_count():
    ad = init_lora(CFG, LORA, jax.random.key(2))
    shapes = jax.tree.map(lambda x: tuple(x.shape), ad)
    assert shapes == adapter_shapes(CFG, LORA)
    assert shapes["layers"]["wq"] == {"a": (2, 64, 4), "b": (2, 4, 64)}
    assert shapes["layers"]["w_down"] == {"a": (2, 128, 4), "b": (2, 4, 64)}
    assert lora_scale(LORA) == 2.0
    D, F, Q, KV = CFG.dim, CFG.hidden_dim, CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    per_layer = 4 * ((D + Q) * 2 + (D + KV) * 2 + (D + F) * 2 + (F + D))
    assert count_params(ad) == CFG.n_layers * per_layer
    assert all(not np.asarray(ab["b"]).any() for ab in ad["layers"].values())
    with pytest.raises(ValueError, match="unknown weight 'wx'"):
        init_lora(CFG, LoraConfig(targets=("wq", "wx")), jax.random.key(0))


def test_zero_init_adapter_is_identity(setup):
    params, tokens, pos = setup
    ad = init_lora(CFG, LORA, jax.random.key(3))
    base, _ = fwd(params, tokens, pos, CFG)
    with_lora, _ = fwd(params, tokens, pos, CFG, lora=ad, lora_scale=lora_scale(LORA))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_merge_matches_on_the_fly_and_hf_roundtrip(setup, tmp_path):
    params, tokens, pos = setup
    ad = _random_adapter(jax.random.key(4))
    s = lora_scale(LORA)
    fly, _ = fwd(params, tokens, pos, CFG, lora=ad, lora_scale=s)
    base, _ = fwd(params, tokens, pos, CFG)
    assert float(jnp.abs(fly - base).max()) > 1e-3  # the adapter does something
    merged = merge(params, ad, s)
    merged_logits, _ = fwd(merged, tokens, pos, CFG)
    # float32: (x@w + s*(x@a)@b) vs x@(w + s*a@b) differ only by rounding order.
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(fly), rtol=1e-4, atol=1e-4)

    save_hf(merged, CFG, tmp_path / "merged")
    loaded, cfg2 = load_hf(tmp_path / "merged")
    assert cfg2.n_layers == CFG.n_layers and cfg2.tie_embeddings is False
    reload_logits, _ = fwd(loaded, tokens, pos, CFG)
    np.testing.assert_array_equal(np.asarray(reload_logits), np.asarray(merged_logits))


def test_top_layers_adapter_equals_full_adapter_with_zero_bottom():
    """An adapter on the top k layers == a full-depth adapter whose lower layers are zero."""
    import dataclasses

    from malt_jax.model import llama, lora

    cfg = ModelConfig.tiny(n_layers=3)
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    top_cfg = LoraConfig(rank=2, targets=("wq", "w_down"), top_layers=2)
    top = lora.init_lora(cfg, top_cfg, jax.random.key(1))
    top = jax.tree.map(lambda x: x + 0.1, top)  # non-zero b
    full = jax.tree.map(lambda t: jnp.concatenate([jnp.zeros_like(t[:1]), t], 0), top)
    toks = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
    pos = llama.causal_positions(2, 7)
    a, _ = llama.forward(params, toks, pos, cfg, lora=top, lora_scale=2.0)
    b, _ = llama.forward(params, toks, pos, cfg, lora=full, lora_scale=2.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    merged, _ = llama.forward(lora.merge(params, top, 2.0), toks, pos, cfg)
    np.testing.assert_allclose(a, merged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="top_layers"):
        lora.init_lora(cfg, dataclasses.replace(top_cfg, top_layers=4), jax.random.key(0))
