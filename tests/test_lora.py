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
    return jax.tree.map(lambda x: x if x.any() else 0.05 * noise[:, :, : x.shape[2]], ad)


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
    # a base with per-layer copies (llama.unstack_top, as Stepper.place makes on CPU): the copies
    # are merged too, not kept stale
    from malt_jax.model.llama import unstack_top

    merged_u = merge(unstack_top(params, CFG.n_layers), ad, s)
    assert len(merged_u["layers_top"]) == CFG.n_layers
    np.testing.assert_allclose(np.asarray(fwd(merged_u, tokens, pos, CFG)[0]), np.asarray(merged_logits), rtol=1e-5)

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


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_lora_delta_hand_written_backward_matches_autodiff(dtype, tol):
    """llama.lora_delta's custom VJP == autodiff of the plain (x @ a) @ b, for every input."""
    from malt_jax.model.llama import lora_delta

    kx, ka, kb, kg = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (3, 5, 16)).astype(dtype)
    a = jax.random.normal(ka, (16, 4)).astype(dtype)
    b = jax.random.normal(kb, (4, 24)).astype(dtype)
    g = jax.random.normal(kg, (3, 5, 24)).astype(dtype)
    y, vjp = jax.vjp(lora_delta, x, a, b)
    y_ref, vjp_ref = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for name, got, want in zip("xab", vjp(g), vjp_ref(g)):
        assert got.shape == want.shape and got.dtype == want.dtype == dtype, name
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale, rtol=0, err_msg=f"d{name}"
        )


def test_adapter_gradient_through_the_model_matches_autodiff_of_plain_lora(setup, monkeypatch):
    """Gradients of a loss w.r.t. every adapter leaf, through the 2-layer scanned model, are the
    same with the hand-written LoRA backward as with autodiff of the plain formula."""
    import malt_jax.model.llama as llama

    params, tokens, pos = setup
    ad = _random_adapter(jax.random.key(4))

    def loss(ad):
        logits, _ = forward(params, tokens, pos, CFG, lora=ad, lora_scale=2.0)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    got = jax.grad(loss)(ad)
    monkeypatch.setattr(llama, "lora_delta", lambda x, a, b: (x @ a) @ b)
    want = jax.grad(loss)(ad)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert float(jnp.abs(w).max()) > 0, path
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()), err_msg=str(path))


def test_adapter_gradient_with_remat_equals_without(setup):
    """The hand-written LoRA backward inside jax.checkpoint (cfg.remat) gives the same adapter
    gradients as without rematerialisation."""
    import dataclasses

    params, tokens, pos = setup
    ad = _random_adapter(jax.random.key(5))

    def loss(ad, cfg):
        logits, _ = forward(params, tokens, pos, cfg, lora=ad, lora_scale=2.0)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    g1 = jax.grad(loss)(ad, CFG)
    g2 = jax.grad(loss)(ad, dataclasses.replace(CFG, remat=True))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        assert float(jnp.abs(a).max()) > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_top_layers_adapter_does_not_copy_the_frozen_layers_weights():
    """With an adapter on the top layer, the layers below run as their own scanned segment; it
    reads each layer from the whole stacked weights (a static slice of the stack would be a copy
    of the frozen layers' weights in every program that runs them: XLA's temporaries)."""
    from malt_jax.model import llama, lora

    cfg = ModelConfig.tiny(n_layers=6, dim=128, hidden_dim=512, head_dim=32)
    params = llama.init_params(cfg, jax.random.key(0))
    top = lora.init_lora(cfg, LoraConfig(rank=2, targets=("wq",), top_layers=1), jax.random.key(1))
    toks = jnp.zeros((1, 8), jnp.int32)
    fn = jax.jit(lambda p, a: llama.forward(p, toks, llama.causal_positions(1, 8), cfg, lora=a)[0])
    temp = fn.lower(params, top).compile().memory_analysis().temp_size_in_bytes
    layer_bytes = sum(w[0].nbytes for w in jax.tree.leaves(params["layers"]))
    # one layer's weights read per step in each of the two segments' scans (the copy of the 5
    # frozen layers' weights made it 7 layers' worth)
    assert temp < 3 * layer_bytes, (temp, layer_bytes)
