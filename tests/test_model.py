"""Model correctness: JAX forward vs an independent NumPy reference, weight import/export."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import ModelConfig
from malt_jax.model import llama, weights
from tests.reference import reference_logits


def random_hf(cfg: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, K, hd, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.hidden_dim
    t = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (cfg.vocab_size, D)),
        "model.norm.weight": 1 + rng.normal(0, 0.1, D),
    }
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = rng.normal(0, 0.1, (cfg.vocab_size, D))

    def s(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.15, shape)

    for i in range(cfg.n_layers):
        t.update(
            {
                f"model.layers.{i}.input_layernorm.weight": 1 + rng.normal(0, 0.1, D),
                f"model.layers.{i}.post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, D),
                f"model.layers.{i}.self_attn.q_proj.weight": s(H * hd, D),
                f"model.layers.{i}.self_attn.k_proj.weight": s(K * hd, D),
                f"model.layers.{i}.self_attn.v_proj.weight": s(K * hd, D),
                f"model.layers.{i}.self_attn.o_proj.weight": s(D, H * hd),
                f"model.layers.{i}.mlp.gate_proj.weight": s(F, D),
                f"model.layers.{i}.mlp.up_proj.weight": s(F, D),
                f"model.layers.{i}.mlp.down_proj.weight": s(D, F),
            }
        )
    return t


def _write_hf(tmp_path, cfg, hf):
    from safetensors.numpy import save_file

    save_file({k: v.astype(np.float32) for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.dim,
                "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads,
                "intermediate_size": cfg.hidden_dim,
                "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "tie_word_embeddings": cfg.tie_embeddings,
                "max_position_embeddings": cfg.max_seq_len,
            }
        )
    )
    return tmp_path


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_reference(tmp_path, tied):
    cfg = ModelConfig.tiny(tie_embeddings=tied)
    hf = random_hf(cfg)
    params, loaded_cfg = weights.load_hf(_write_hf(tmp_path, cfg, hf))
    assert loaded_cfg == cfg
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 23)
    ref = reference_logits(hf, cfg, tokens)
    out, _ = llama.forward(params, jnp.asarray(tokens)[None], llama.causal_positions(1, 23), cfg)
    chex.assert_shape(out, (1, 23, cfg.vocab_size))
    chex.assert_type(out, jnp.float32)
    # float32 JAX vs float64 NumPy: relative error stays below 1e-4 of the logit scale
    np.testing.assert_allclose(np.asarray(out[0]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cached_prefill_plus_steps_equals_full_forward():
    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    full, _ = llama.forward(params, toks, llama.causal_positions(2, 12), cfg)
    cache = llama.KVCache.zeros(cfg, 2, 16)
    a, cache = llama.forward(params, toks[:, :8], llama.causal_positions(2, 8), cfg, cache=cache)
    outs = [a]
    for t in range(8, 12):
        o, cache = llama.forward(params, toks[:, t : t + 1], jnp.full((2, 1), t), cfg, cache=cache)
        outs.append(o)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_cache_ignores_stale_slots_and_grows():
    """Slots at or above a row's first new position are never read, whatever they hold (forked
    caches carry other rows' junk there); growing a cache keeps its slots."""
    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    toks = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    full, _ = llama.forward(params, toks, llama.causal_positions(2, 10), cfg)
    junk = llama.KVCache(
        k=jax.random.normal(jax.random.key(2), (cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim, 7)),
        v=jax.random.normal(jax.random.key(3), (cfg.n_layers, 2, cfg.n_kv_heads, 7, cfg.head_dim)),
    )
    # ragged prefill: row 0 takes 6 tokens, row 1 takes 4 (right-padded to 6)
    lens = jnp.asarray([6, 4])
    valid = jnp.arange(6)[None] < lens[:, None]
    a, cache = llama.forward(params, toks[:, :6], llama.causal_positions(2, 6), cfg, cache=junk, token_valid=valid)
    np.testing.assert_allclose(a[0], full[0, :6], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(a[1, :4], full[1, :4], rtol=2e-5, atol=2e-5)
    grown = cache.grow(12)
    chex.assert_shape(grown.k, (cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim, 12))
    chex.assert_shape(grown.v, (cfg.n_layers, 2, cfg.n_kv_heads, 12, cfg.head_dim))
    np.testing.assert_array_equal(grown.k[..., :7], cache.k)
    np.testing.assert_array_equal(grown.k[..., 7:], 0.0)
    np.testing.assert_array_equal(grown.v[:, :, :, :7], cache.v)
    np.testing.assert_array_equal(grown.v[:, :, :, 7:], 0.0)
    with pytest.raises(ValueError, match="3 slots < current 12"):
        grown.grow(3)
    # continue each row from its own position, one token at a time
    pos = lens
    for _ in range(4):
        step_tok = jnp.take_along_axis(toks, pos[:, None], axis=1)
        o, grown = llama.forward(params, step_tok, pos[:, None], cfg, cache=grown)
        np.testing.assert_allclose(o[:, 0], full[jnp.arange(2), pos], rtol=2e-5, atol=2e-5)
        pos = pos + 1


def test_left_padding_with_positions_matches_unpadded():
    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    toks = jax.random.randint(jax.random.key(1), (1, 7), 0, cfg.vocab_size)
    ref, _ = llama.forward(params, toks, llama.causal_positions(1, 7), cfg)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], 1)
    valid = jnp.arange(10)[None] >= 3
    pos = jnp.maximum(jnp.arange(10)[None] - 3, 0)
    out, _ = llama.forward(params, padded, pos, cfg, token_valid=valid)
    np.testing.assert_allclose(out[:, 3:], ref, rtol=2e-5, atol=2e-5)


def test_bf16_close_to_fp32():
    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    toks = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab_size)
    ref, _ = llama.forward(params, toks, llama.causal_positions(1, 9), cfg)
    cfg16 = ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out, _ = llama.forward(p16, toks, llama.causal_positions(1, 9), cfg16)
    assert out.dtype == jnp.float32
    assert np.mean(np.argmax(out, -1) == np.argmax(ref, -1)) > 0.6
    assert np.abs(np.asarray(out) - np.asarray(ref)).mean() < 0.1 * np.abs(np.asarray(ref)).mean()


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """The operand element types of every dot in a compiled HLO module's text."""
    types = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", hlo, re.M))
    dots = re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [(types[a], types[b]) for a, b in dots]


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_lowp_matmul_runs_bf16_dots_forward_and_backward(out_dtype):
    """llama.lowp_matmul: the products of bf16 numbers accumulated in float32, forward and both
    gradients, and every dot of the compiled forward + backward takes bf16 operands (the form
    XLA:CPU runs on the bf16 instructions; autodiff would give float32 x bf16 products)."""
    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (2, 5, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (64, 48)).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (2, 5, 48)).astype(out_dtype)
    y, vjp = jax.vjp(lambda x, w: llama.lowp_matmul(x, w, out_dtype), x, w)
    dx, dw = vjp(g)
    assert y.dtype == out_dtype and dx.dtype == dw.dtype == jnp.bfloat16
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    gb = f(g.astype(jnp.bfloat16))  # the cotangent is rounded to bf16 before its products
    for got, want in ((y, f(x) @ f(w)), (dx, gb @ f(w).T), (dw, f(x).reshape(10, 64).T @ gb.reshape(10, 48))):
        # float32 accumulation, one rounding to the result dtype (bf16: 8 bits)
        tol = 2e-7 if got.dtype == jnp.float32 else 2**-8
        np.testing.assert_allclose(f(got), want, rtol=tol, atol=tol * np.abs(want).max())
    # the forward and the input gradient (what a frozen base needs); XLA:CPU runs dw's product,
    # which contracts the token axis of both operands, in f32 even with bf16 operands
    grad = jax.jit(jax.grad(lambda x, w: (llama.lowp_matmul(x, w, out_dtype).astype(jnp.float32) ** 2).sum()))
    dots = _dot_operand_dtypes(grad.lower(x, w).compile().as_text())
    assert len(dots) == 2 and all(d == ("bf16", "bf16") for d in dots), dots


def test_bf16_adapter_gradients_close_to_fp32():
    """A bf16 model (bf16 weights and activations, lowp_matmul products) gives LoRA gradients
    close to the float32 model's, and its float32 path is the plain one (no lowp_matmul)."""
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.1)
    lcfg = LoraConfig(rank=4, alpha=8.0)
    ad = jax.tree.map(lambda a: a + 0.05, lora.init_lora(cfg, lcfg, jax.random.key(1)))
    toks = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)

    def loss(ad, params, cfg):
        logits, _ = llama.forward(params, toks[:, :-1], llama.causal_positions(2, 11), cfg, lora=ad, lora_scale=2.0)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1).mean()

    cfg16 = ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g32 = jax.grad(loss)(ad, params, cfg)
    g16 = jax.grad(loss)(ad, p16, cfg16)
    a, b = (np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)]) for t in (g32, g16))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g16))  # the adapter stays f32
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) < 0.05
    f32_hlo = jax.jit(jax.grad(loss), static_argnums=2).lower(ad, params, cfg).as_text()
    assert "bf16" not in f32_hlo


def test_hf_roundtrip(tmp_path):
    cfg = ModelConfig.tiny(tie_embeddings=False)
    params = llama.init_params(cfg, jax.random.key(3))
    weights.save_hf(params, cfg, tmp_path)
    back, cfg2 = weights.load_hf(tmp_path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(back, params)


def test_gguf_roundtrip_unpermutes_qk(tmp_path):
    """A GGUF written the llama.cpp way (Q/K rows permuted, Q8_0 matrices) loads to the same model."""
    from tests.fixtures import write_gguf

    cfg = ModelConfig.tiny(vocab_size=256, dim=64, hidden_dim=128)
    hf = random_hf(cfg, seed=5)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, hf, quantize=True)
    params, cfg2 = weights.load_gguf(path)
    assert cfg2.n_heads == cfg.n_heads and cfg2.tie_embeddings
    tokens = np.arange(0, 40, 3)
    ref = reference_logits(hf, cfg, tokens)
    out, _ = llama.forward(params, jnp.asarray(tokens)[None], llama.causal_positions(1, len(tokens)), cfg2)
    # Q8_0 quantization error only (the un-permutation must be exact for this to hold)
    assert np.corrcoef(np.asarray(out[0]).ravel(), ref.ravel())[0, 1] > 0.999


def test_shape_mismatch_names_tensor(tmp_path):
    cfg = ModelConfig.tiny()
    _write_hf(tmp_path, cfg, random_hf(cfg))
    with pytest.raises(weights.WeightError, match=r"tensor layer 0 wo has shape \(64, 64\), expected \(128, 64\)"):
        weights.load_hf(tmp_path, ModelConfig.tiny(n_heads=8, n_kv_heads=2))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(weights.WeightError, match="not found"):
        weights.load_weights(tmp_path / "nope.gguf")
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(weights.WeightError, match="trunc.gguf"):
        weights.load_gguf(bad)
    cfg = ModelConfig.tiny()
    d = _write_hf(tmp_path / "hf", cfg, random_hf(cfg)) if (tmp_path / "hf").mkdir() is None else None
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(weights.WeightError, match="truncated"):
        weights.load_hf(d)


def test_llama_presets_shapes():
    c8 = ModelConfig.llama31_8b()
    assert 7.9e9 < c8.n_params < 8.1e9
    c1 = ModelConfig.llama32_1b()
    assert 1.1e9 < c1.n_params < 1.3e9
    assert 1.3e8 < ModelConfig.smollm2_135m().n_params < 1.4e8
    inv = llama.rope_frequencies(c8)
    assert inv.shape == (64,) and float(inv[-1]) < 1.0 / 500000.0 ** (126 / 128)  # low freqs scaled down


@pytest.mark.slow
def test_smollm2_greedy_is_coherent():
    from malt_jax.config import SamplingConfig
    from malt_jax.model.files import smollm2_gguf_path
    from malt_jax.model.tokenizer import Tokenizer
    from malt_jax.sampling import decode as sampling

    params, cfg = weights.load_weights("smollm2")
    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    x, n = sampling.pad_batch([ids])
    g = sampling.generate(
        params,
        jnp.asarray(x),
        jnp.asarray(n),
        sampling.row_keys(0, 1),
        cfg=cfg,
        sampling=SamplingConfig(greedy=True),
        stop=sampling.StopCriteria(tuple(tok.stop_ids)),
        max_new_tokens=24,
    )
    text = tok.decode(sampling.trim(g)[0])
    assert "Paris" in text
    assert bool(g.stopped[0])


def test_remat_gives_same_gradients():
    import dataclasses

    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

    def loss(p, c):
        return llama.forward(p, toks, llama.causal_positions(2, 9), c)[0].std()

    g1 = jax.grad(loss)(params, cfg)
    g2 = jax.grad(loss)(params, dataclasses.replace(cfg, remat=True))
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_refresh_top_equals_reencoding_with_the_adapter():
    """A cache written without an adapter, refreshed on the top layer with one, holds what
    encoding the same tokens with the adapter writes; the next token's logits agree too."""
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    cfg = ModelConfig.tiny()
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    ad = lora.init_lora(cfg, LoraConfig(rank=2, top_layers=1), jax.random.key(1))
    ad = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(2), w.shape), ad)
    toks = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
    lens = jnp.asarray([9, 6])
    valid = jnp.arange(9)[None] < lens[:, None]
    top = cfg.n_layers - 1
    plain, _ = llama.forward(
        params,
        toks,
        llama.causal_positions(2, 9),
        cfg,
        token_valid=valid,
        cache=llama.KVCache.zeros(cfg, 2, 12, hidden_at=top),
    )
    _, plain_cache = llama.forward(
        params,
        toks,
        llama.causal_positions(2, 9),
        cfg,
        token_valid=valid,
        cache=llama.KVCache.zeros(cfg, 2, 12, hidden_at=top),
    )
    refreshed = llama.refresh_top(params, cfg, plain_cache, lens, ad)
    _, want = llama.forward(
        params,
        toks,
        llama.causal_positions(2, 9),
        cfg,
        token_valid=valid,
        lora=ad,
        cache=llama.KVCache.zeros(cfg, 2, 12, hidden_at=top),
    )
    filled = jnp.arange(12)[None] < lens[:, None]  # [B, S]
    mask_k, mask_v = filled[None, :, None, None, :], filled[None, :, None, :, None]  # keys: [L, B, K, hd, S]
    for got, ref, mask in [(refreshed.k, want.k, mask_k), (refreshed.v, want.v, mask_v)]:
        np.testing.assert_allclose(jnp.where(mask, got, 0), jnp.where(mask, ref, 0), rtol=2e-5, atol=2e-5)
    assert not np.allclose(jnp.where(mask_k, plain_cache.k, 0)[top], jnp.where(mask_k, want.k, 0)[top])
    np.testing.assert_array_equal(refreshed.k[:top], plain_cache.k[:top])  # lower layers untouched
    nxt = jnp.asarray([[5], [7]])
    a, _ = llama.forward(params, nxt, lens[:, None], cfg, cache=refreshed, lora=ad)
    b, _ = llama.forward(params, nxt, lens[:, None], cfg, cache=want, lora=ad)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="hidden_at > 0"):
        llama.refresh_top(params, cfg, llama.KVCache.zeros(cfg, 2, 12), lens, ad)
    full = lora.init_lora(cfg, LoraConfig(rank=2), jax.random.key(1))
    with pytest.raises(ValueError, match="starts at layer 0"):
        llama.refresh_top(params, cfg, plain_cache, lens, full)


def test_unstacked_top_layers_give_the_same_passes():
    """``unstack_top``: per-layer copies of the top layers, run unrolled by the passes without a
    KV cache (training, scoring, hidden states), give those passes' values and adapter gradients;
    the cached passes keep reading the stacked weights."""
    from malt_jax.config import LoraConfig
    from malt_jax.model import lora

    cfg = ModelConfig.tiny(n_layers=3)
    L = cfg.n_layers
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    ad = lora.init_lora(cfg, LoraConfig(rank=2, top_layers=2), jax.random.key(1))
    ad = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(2), w.shape), ad)
    toks = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
    pos = llama.causal_positions(2, 9)

    def loss(a, p):
        return llama.forward(p, toks, pos, cfg, lora=a, lora_scale=0.7)[0].std()

    want, want_g = jax.value_and_grad(loss)(ad, params)
    want_h = llama.hidden_at(params, toks, cfg, 1)
    want_top = llama.forward_from(params, want_h, cfg, 1, lora=ad)
    cached = llama.forward(params, toks, pos, cfg, lora=ad, cache=llama.KVCache.zeros(cfg, 2, 12))[0]
    for n in (1, 2, L):
        up = llama.unstack_top(params, n)
        assert len(up["layers_top"]) == n
        for i, layer in enumerate(up["layers_top"]):
            chex.assert_trees_all_equal(layer, jax.tree.map(lambda w, j=L - n + i: w[j], params["layers"]))
        got, got_g = jax.value_and_grad(loss)(ad, up)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        chex.assert_trees_all_close(got_g, want_g, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(llama.hidden_at(up, toks, cfg, 1), want_h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(llama.forward_from(up, want_h, cfg, 1, lora=ad), want_top, rtol=1e-5, atol=1e-5)
        got_c = llama.forward(up, toks, pos, cfg, lora=ad, cache=llama.KVCache.zeros(cfg, 2, 12))[0]
        np.testing.assert_array_equal(got_c, cached)  # the cached pass ignores the copies
    # all layers unstacked: no scan left in the no-cache pass; the stacked params scan
    assert "scan" not in str(jax.make_jaxpr(loss)(ad, llama.unstack_top(params, L)))
    assert "scan" in str(jax.make_jaxpr(loss)(ad, params))
    assert "layers_top" not in llama.unstack_top(llama.unstack_top(params, 2), 0)
    with pytest.raises(ValueError, match="n=4 > the model's 3 layers"):
        llama.unstack_top(params, 4)


@pytest.mark.parametrize("blocks", [2, 3, 4, 40])
def test_attention_key_blocks_equal_the_dense_attention(blocks):
    """Query blocks that score only the keys up to their own end give the dense attention on
    rows whose tokens see only earlier tokens (causal rows with padding, and a shared-prompt DPO
    row from data.pack_dpo_shared), not on a row that breaks that contract."""
    from malt_jax.training import data

    B, T, H, K, hd = 2, 16, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, hd))
    k, v = (jax.random.normal(kk, (B, K, T, hd)) for kk in ks[1:])
    pos = llama.causal_positions(B, T)
    valid = jnp.arange(T)[None] < jnp.asarray([[T], [9]])
    dense = llama.attention(q, k, v, pos, pos, valid)
    np.testing.assert_allclose(
        llama.attention(q, k, v, pos, pos, valid, key_blocks=blocks), dense, rtol=1e-5, atol=1e-6
    )
    row = data.pack_dpo_shared([data.DPOExample([3, 4, 5], [6, 7, 8, 9], [10, 11, 12])] * 2, T)
    assert row["tokens"].shape == (2, T)
    p, seg = jnp.asarray(row["positions"]), jnp.asarray(row["segments"])
    real = seg != data.SEG_PAD
    dense = llama.attention(q, k, v, p, p, real, seg)
    got = llama.attention(q, k, v, p, p, real, seg, key_blocks=blocks)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)
    backwards = jnp.broadcast_to(jnp.arange(T)[::-1], (B, T))  # every token sees the tokens after it
    dense = llama.attention(q, k, v, backwards, backwards, valid)
    assert not np.allclose(llama.attention(q, k, v, backwards, backwards, valid, key_blocks=blocks), dense, atol=1e-3)
    with pytest.raises(ValueError, match="needs self-attention"):
        llama.attention(q, k[:, :, :5], v[:, :, :5], pos, pos[:, :5], valid[:, :5], key_blocks=blocks)
