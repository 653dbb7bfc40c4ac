"""Weight import/export: GGUF (llama.cpp) and Hugging Face safetensors directories.

Both importers produce the parameter pytree of ``llama.py`` (linear weights ``[in, out]``,
layers stacked) and check every tensor's shape against the config, naming the tensor and the
file on mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from malt_jax.config import ModelConfig
from malt_jax.model.llama import Params, param_shapes


class WeightError(ValueError):
    """A checkpoint is missing, truncated or does not match the model configuration."""


# per-layer tensors: our name -> (HF name, GGUF name)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
    # Qwen2: q/k/v projection biases; Qwen3: per-head RMSNorm of q and k
    "bq": ("self_attn.q_proj.bias", "attn_q.bias"),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias"),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias"),
    "q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
}

ARCHS = ("llama", "qwen2", "qwen3")
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF rotate-half -> interleaved rope); w is [out, in]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`gguf_permute`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _assemble(cfg: ModelConfig, get: Callable[[str, int | None], np.ndarray], source: str) -> Params:
    """Builds the params pytree; ``get(name, layer)`` returns an HF-layout array ([out, in])."""
    expected = param_shapes(cfg)
    dt = jnp.dtype(cfg.param_dtype)

    def check(name: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
        if tuple(arr.shape) != tuple(shape):
            raise WeightError(
                f"{source}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(shape)} "
                f"for this model config (dim={cfg.dim}, layers={cfg.n_layers}, heads={cfg.n_heads}/"
                f"{cfg.n_kv_heads}, ffn={cfg.hidden_dim}, vocab={cfg.vocab_size})"
            )
        return arr

    layers: dict[str, Any] = {}
    for ours, shape in expected["layers"].items():
        per_layer = []
        for i in range(cfg.n_layers):
            a = get(ours, i)
            if a.ndim == 2:
                a = a.T  # HF [out, in] -> ours [in, out]
            per_layer.append(check(f"layer {i} {ours}", a, shape[1:]))
        layers[ours] = jnp.asarray(np.stack(per_layer), dtype=dt)
    params: Params = {
        "embed": jnp.asarray(check("embed", get("embed", None), expected["embed"]), dtype=dt),
        "layers": layers,
        "final_norm": jnp.asarray(check("final_norm", get("final_norm", None), expected["final_norm"]), dtype=dt),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = jnp.asarray(check("lm_head", get("lm_head", None).T, expected["lm_head"]), dtype=dt)
    return params


# ----------------------------------------------------------------------------------------------
# GGUF


def _open_gguf(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or not a GGUF file
        raise WeightError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e}); is it truncated?") from None


def _field(reader, key: str, path: Path, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise WeightError(f"{path}: GGUF metadata key {key!r} is missing")
    return f.contents()


def gguf_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """Reads the model shape from GGUF metadata."""
    path = Path(path)
    r = _open_gguf(path)
    arch = _field(r, "general.architecture", path)
    if arch not in ARCHS:
        raise WeightError(f"{path}: general.architecture = {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    names = {t.name for t in r.tensors}
    a = arch
    dim = int(_field(r, f"{a}.embedding_length", path))
    heads = int(_field(r, f"{a}.attention.head_count", path))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(r, f"{a}.vocab_size", path, default=len(tokens.data) if tokens else None))
    kw = dict(
        arch=arch,
        vocab_size=vocab,
        dim=dim,
        n_layers=int(_field(r, f"{a}.block_count", path)),
        n_heads=heads,
        n_kv_heads=int(_field(r, f"{a}.attention.head_count_kv", path, default=heads)),
        head_dim=int(
            _field(
                r,
                f"{a}.attention.key_length",
                path,
                default=_field(r, f"{a}.rope.dimension_count", path, default=dim // heads),
            )
        ),
        hidden_dim=int(_field(r, f"{a}.feed_forward_length", path)),
        norm_eps=float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", path)),
        rope_theta=float(_field(r, f"{a}.rope.freq_base", path, default=10000.0)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(_field(r, f"{a}.context_length", path, default=2048)),
    )
    if r.fields.get(f"{a}.rope.scaling.type") is not None and _field(r, f"{a}.rope.scaling.type", path) != "none":
        raise WeightError(
            f"{path}: {a}.rope.scaling.type = {_field(r, f'{a}.rope.scaling.type', path)!r} is not "
            "supported (only unscaled rope in GGUF files)"
        )
    kw.update(overrides)
    return ModelConfig(**kw)


def load_gguf(path: str | Path, cfg: ModelConfig | None = None) -> tuple[Params, ModelConfig]:
    """Loads (and dequantizes) a llama GGUF file; Q/K rows are un-permuted to rotate-half."""
    from gguf import quants

    path = Path(path)
    cfg = cfg or gguf_config(path)
    reader = _open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}

    def raw(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise WeightError(f"{path}: tensor {name!r} is missing")
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise WeightError(f"{path}: cannot dequantize {name} ({t.tensor_type.name}): {e}") from None
        return np.asarray(arr, dtype=np.float32)

    def get(ours: str, layer: int | None) -> np.ndarray:
        if layer is None:
            return raw(
                {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}[ours]
            )
        a = raw(f"blk.{layer}.{_LAYER_NAMES[ours][1]}")
        if cfg.arch == "llama":  # llama.cpp permutes Q/K rows for its interleaved rope (Qwen: not)
            if ours == "wq":
                a = gguf_unpermute(a, cfg.n_heads)
            elif ours == "wk":
                a = gguf_unpermute(a, cfg.n_kv_heads)
        return a

    return _assemble(cfg, get, str(path)), cfg


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors


def hf_config(model_dir: str | Path, **overrides: Any) -> ModelConfig:
    """Model shape from a Hugging Face ``config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise WeightError(f"{path} not found (expected a Hugging Face checkpoint directory)")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    model_type = c.get("model_type", "llama")
    if model_type not in ARCHS:
        raise WeightError(
            f"{path}: model_type = {model_type!r} is not supported (supported: {', '.join(ARCHS)}); "
            "loading it as Llama would compute wrong logits"
        )

    def refuse(field: str, why: str) -> WeightError:
        return WeightError(f"{path}: {field} = {c.get(field)!r}: {why}")

    if c.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "only silu MLPs are supported")
    if c.get("mlp_bias"):
        raise refuse("mlp_bias", "MLP biases are not supported")
    if c.get("attention_bias") and model_type != "qwen2":
        raise refuse("attention_bias", f"attention biases are not supported for {model_type}")
    if c.get("use_sliding_window"):
        raise refuse("use_sliding_window", "sliding-window attention is not supported (full attention only)")
    try:
        heads = c["num_attention_heads"]
        # transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older files
        # rope_theta and rope_scaling at the top level
        rp = c.get("rope_parameters") or {}
        field = "rope_parameters" if rp else "rope_scaling"
        rs = rp or c.get("rope_scaling")
        theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = None
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = tuple(
                (k, float(rs[k]))
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            )
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise refuse(field, "only Llama-3 rope scaling (or none) is supported")
        if any(t != "full_attention" for t in c.get("layer_types") or []):
            raise refuse("layer_types", "only full attention layers are supported (no sliding-window layers)")
        kw = dict(
            arch=model_type,
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            hidden_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=c.get("tie_word_embeddings", False),
            max_seq_len=c.get("max_position_embeddings", 2048),
        )
    except KeyError as e:
        raise WeightError(f"{path}: missing key {e.args[0]!r}") from None
    kw.update(overrides)
    return ModelConfig(**kw)


def load_hf(model_dir: str | Path, cfg: ModelConfig | None = None) -> tuple[Params, ModelConfig]:
    """Loads a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory (config.json + *.safetensors,
    sharded or not: every ``*.safetensors`` file is read; an index file, when present, must
    name only files that exist)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = cfg or hf_config(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{model_dir}: no *.safetensors files found")
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise WeightError(f"{index_file}: not a safetensors index (needs a weight_map): {e}") from None
        missing = sorted(sh for sh in shards if not (model_dir / sh).is_file())
        if missing:
            raise WeightError(f"{index_file}: shard {missing[0]} named in weight_map is missing")
    index: dict[str, Any] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="numpy")
        except Exception as e:
            raise WeightError(f"{f}: cannot read safetensors file ({e}); is it truncated?") from None
        for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict: it has keys() but no __iter__
            index[k] = h

    def tensor(name: str) -> np.ndarray:
        h = index.get(name)
        if h is None:
            raise WeightError(f"{model_dir}: tensor {name!r} is missing from the safetensors files")
        return np.asarray(h.get_tensor(name), dtype=np.float32)

    def get(ours: str, layer: int | None) -> np.ndarray:
        if layer is None:
            return tensor(
                {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}[
                    ours
                ]
            )
        return tensor(f"model.layers.{layer}.{_LAYER_NAMES[ours][0]}")

    return _assemble(cfg, get, str(model_dir)), cfg


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Writes params as a Hugging Face checkpoint of ``cfg.arch`` (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dt = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dt is None:
        raise WeightError(f"save_hf: dtype must be float32 or float16, got {dtype!r}")
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(params["embed"], np_dt),
        "model.norm.weight": np.asarray(params["final_norm"], np_dt),
    }
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np_dt).T)
    for ours, (hf, _) in _LAYER_NAMES.items():
        if ours not in params["layers"]:
            continue
        stacked = np.asarray(params["layers"][ours], np_dt)
        for i in range(cfg.n_layers):
            a = stacked[i]
            tensors[f"model.layers.{i}.{hf}"] = np.ascontiguousarray(a.T if a.ndim == 2 else a)
    save_file(tensors, str(out / "model.safetensors"))
    config: dict[str, Any] = {
        "architectures": [_HF_ARCH[cfg.arch]],
        "model_type": cfg.arch,
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
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
    if cfg.arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if cfg.arch == "qwen3":
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ----------------------------------------------------------------------------------------------


def load_weights(source: str | Path, cfg: ModelConfig | None = None) -> tuple[Params, ModelConfig]:
    """Loads weights from ``"smollm2"`` (the embedded default), a ``.gguf`` file or an HF directory."""
    if str(source) == "smollm2":
        from malt_jax.model.files import smollm2_gguf_path

        source = smollm2_gguf_path()
    p = Path(source)
    if p.is_dir():
        return load_hf(p, cfg)
    if p.suffix == ".gguf" or p.is_file():
        return load_gguf(p, cfg)
    raise WeightError(f"weights not found: {source} (give 'smollm2', a .gguf file or a Hugging Face directory)")
