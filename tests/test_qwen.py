"""Qwen2 (q/k/v biases) and Qwen3 (q/k head norms) as options of the one decoder: parity with the
NumPy float64 reference, Hugging Face and GGUF import, presets, LoRA training and tree expansion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax.config import ConfigError, LoraConfig, ModelConfig, SamplingConfig, TrainConfig
from malt_jax.model import llama, lora, weights
from malt_jax.sampling import decode as sampling, expansion
from tests.fixtures import write_gguf
from tests.reference import reference_logits
from tests.test_model import random_hf

ARCHS = ("qwen2", "qwen3")


def _cfg(arch, **kw):
    return ModelConfig.tiny(arch=arch, rope_theta=1e6, norm_eps=1e-6, **kw)


def _random_qwen_hf(cfg, seed=0):
    hf = random_hf(cfg, seed)
    rng = np.random.default_rng(seed + 100)
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        if cfg.arch == "qwen2":
            for n, rows in (("q", H), ("k", K), ("v", K)):
                hf[f"model.layers.{i}.self_attn.{n}_proj.bias"] = rng.normal(0, 0.3, rows * hd)
        else:
            for n in ("q", "k"):
                hf[f"model.layers.{i}.self_attn.{n}_norm.weight"] = 1 + rng.normal(0, 0.2, hd)
    return hf


def _write(tmp_path, cfg, hf, **extra):
    from safetensors.numpy import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    config = {
        "model_type": cfg.arch,
        "architectures": ["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "Qwen3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": 4096,
        **({"attention_bias": False} if cfg.arch == "qwen3" else {}),
        **extra,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_numpy_reference(tmp_path, arch, tied):
    cfg = _cfg(arch, tie_embeddings=tied)
    hf = _random_qwen_hf(cfg)
    params, loaded = weights.load_hf(_write(tmp_path, cfg, hf))
    assert loaded == cfg and loaded.arch == arch
    assert ("bq" in params["layers"]) == (arch == "qwen2") and ("q_norm" in params["layers"]) == (arch == "qwen3")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 19)
    ref = reference_logits(hf, cfg, tokens)
    out, _ = llama.forward(params, jnp.asarray(tokens)[None], llama.causal_positions(1, 19), cfg)
    np.testing.assert_allclose(np.asarray(out[0]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the same tensors read as plain Llama give other logits: the new fields matter
    plain, _ = llama.forward(
        {
            **params,
            "layers": {k: v for k, v in params["layers"].items() if k not in ("bq", "bk", "bv", "q_norm", "k_norm")},
        },
        jnp.asarray(tokens)[None],
        llama.causal_positions(1, 19),
        ModelConfig.tiny(rope_theta=1e6, norm_eps=1e-6, tie_embeddings=tied),
    )
    assert np.abs(np.asarray(plain[0]) - ref).max() > 1e-2 * np.abs(ref).max()
    # export back to safetensors and re-import: identical
    again, cfg2 = weights.load_hf(weights.save_hf(params, cfg, tmp_path / "out"))
    assert cfg2 == cfg
    for k in params["layers"]:
        np.testing.assert_array_equal(np.asarray(again["layers"][k]), np.asarray(params["layers"][k]))


def test_sharded_checkpoint_with_index(tmp_path):
    from safetensors.numpy import save_file

    cfg = _cfg("qwen2")
    hf = _random_qwen_hf(cfg, seed=3)
    d = _write(tmp_path / "one", cfg, hf)
    one, _ = weights.load_hf(d)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((d / "config.json").read_text())
    keys = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: hf[k].astype(np.float32) for k in ks}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}})
    )
    two, _ = weights.load_hf(sharded)
    for k in one["layers"]:
        np.testing.assert_array_equal(np.asarray(one["layers"][k]), np.asarray(two["layers"][k]))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(weights.WeightError, match="shard model-00002-of-00002.safetensors named in weight_map"):
        weights.load_hf(sharded)


def test_unsupported_checkpoints_name_the_field_and_file(tmp_path):
    cfg = _cfg("qwen2")
    hf = _random_qwen_hf(cfg)
    for i, (extra, match) in enumerate(
        (
            ({"model_type": "mistral"}, "model_type = 'mistral' is not supported"),
            ({"use_sliding_window": True}, "use_sliding_window = True: sliding-window attention"),
            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling = .*yarn"),
            ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
            ({"model_type": "qwen3", "attention_bias": True}, "attention_bias = True"),
            ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_parameters = .*yarn"),
            ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types = .*sliding"),
        )
    ):
        d = _write(tmp_path / str(i), cfg, hf, **extra)
        with pytest.raises(weights.WeightError, match=match) as e:
            weights.load_hf(d)
        assert str(d / "config.json") in str(e.value)
    # Qwen2 tensors without their biases: the missing tensor is named
    d = _write(tmp_path / "nobias", cfg, {k: v for k, v in hf.items() if not k.endswith("bias")})
    with pytest.raises(weights.WeightError, match=r"tensor .model.layers.0.self_attn.[qkv]_proj.bias. is missing"):
        weights.load_hf(d)
    with pytest.raises(ConfigError, match="arch"):
        ModelConfig.tiny(arch="gemma")


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_import(tmp_path, arch):
    cfg = _cfg(arch, tie_embeddings=False)
    hf = _random_qwen_hf(cfg, seed=7)
    params, cfg2 = weights.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, hf))
    assert cfg2.arch == arch and cfg2.head_dim == cfg.head_dim and not cfg2.tie_embeddings
    tokens = np.arange(1, 40, 3)
    ref = reference_logits(hf, cfg, tokens)
    out, _ = llama.forward(params, jnp.asarray(tokens)[None], llama.causal_positions(1, len(tokens)), cfg2)
    np.testing.assert_allclose(np.asarray(out[0]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gguf_unknown_architecture(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(weights.WeightError, match=r"x.gguf: general.architecture = 'gemma2' is not supported"):
        weights.load_gguf(path)


PRESET_PARAMS = {  # total parameter counts of the released checkpoints
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_presets_parameter_counts(name):
    from malt_jax.config import MODEL_PRESETS

    cfg = MODEL_PRESETS[name]()
    assert cfg.arch == name.split("-")[0].replace("2.5", "2") and cfg.dtype == "bfloat16"
    shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert counted == cfg.n_params == PRESET_PARAMS[name]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_sft_and_dpo_steps_train(tmp_path, arch):
    from malt_jax.training import data as D
    from malt_jax.training.role import train_role

    cfg = _cfg(arch, n_layers=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape) if x.ndim > 1 else x),
        llama.init_params(cfg, jax.random.key(0)),
    )
    ex = lambda: list(rng.integers(1, 256, 6))  # noqa: E731
    sft = [D.SFTExample(ex(), ex()) for _ in range(8)]
    dpo = [D.DPOExample(ex(), ex(), ex()) for _ in range(8)]
    lc = LoraConfig(rank=2, alpha=4.0, targets=("wq", "wk", "wv"))
    tc = TrainConfig(
        learning_rate=1e-2,
        dpo_learning_rate=1e-2,
        batch_size=8,
        max_seq_len=32,
        sft_epochs=1,
        dpo_epochs=1,
        checkpoint_every=10,
        warmup_ratio=0.0,
    )
    out = train_role(params, cfg, lc, tc, sft, dpo, "verifier", tmp_path / "ckpt", progress=False)
    assert out.trained and [h["stage"] for h in out.history] == ["sft", "dpo"]
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in out.history)
    assert out.history[1]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # DPO starts at log 2 (policy = reference)
    assert float(jnp.abs(out.adapter["layers"]["wq"]["b"]).max()) > 0  # the adapter moved


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_expansion_fork_equals_naive(arch):
    cfg = _cfg(arch)
    params = llama.init_params(cfg, jax.random.key(0), std=0.25)
    if arch == "qwen2":
        params["layers"]["bq"] = 0.3 * jax.random.normal(jax.random.key(5), params["layers"]["bq"].shape)
    else:
        params["layers"]["k_norm"] = 1 + 0.3 * jax.random.normal(jax.random.key(5), params["layers"]["k_norm"].shape)
    rng = np.random.default_rng(0)
    x, lens = sampling.pad_batch([rng.integers(3, 256, k).tolist() for k in (5, 9)], bucket=8)
    turns = (jnp.asarray([1, 7, 8, 9]), jnp.asarray([1, 10, 11]))
    adapters = tuple(
        jax.tree.map(
            lambda w, r=r: w + 0.3 * jax.random.normal(jax.random.key(9 + r), w.shape),
            lora.init_lora(cfg, LoraConfig(rank=2, top_layers=1), jax.random.key(r)),
        )
        for r in range(3)
    )

    def run(mode, ads=(None, None, None)):
        spec = expansion.ExpansionSpec(
            n=2,
            m=2,
            l=2,
            max_new=(5, 4, 3),
            sampling=SamplingConfig(temperature=1.0),
            stop=sampling.StopCriteria(stop_ids=(2,)),
            mode=mode,
        )
        return expansion.expand(
            params, ads, jnp.asarray(x), jnp.asarray(lens), turns, sampling.row_keys(11, 2), cfg=cfg, spec=spec
        )

    for ads in ((None, None, None), adapters):
        f, n = run("fork", ads), run("naive", ads)
        for level in range(3):
            np.testing.assert_array_equal(np.asarray(f.tokens[level]), np.asarray(n.tokens[level]))
    e = run("extend")
    np.testing.assert_array_equal(np.asarray(e.tokens[2]), np.asarray(run("naive").tokens[2]))


def test_transformers_5_rope_parameters(tmp_path):
    """transformers >= 5 writes rope_theta inside rope_parameters (a top-level default would
    silently give other logits)."""
    cfg = _cfg("qwen3")
    d = _write(
        tmp_path,
        cfg,
        _random_qwen_hf(cfg),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        layer_types=["full_attention"] * cfg.n_layers,
    )
    conf = json.loads((d / "config.json").read_text())
    del conf["rope_theta"]
    (d / "config.json").write_text(json.dumps(conf))
    assert weights.hf_config(d).rope_theta == 1e6
