"""LoRA adapters for the Llama decoder of ``llama.py``.

An adapter is a plain pytree with the layer axis stacked like the base weights::

    {"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}}   for name in LoraConfig.targets

``llama.forward(..., lora=adapter, lora_scale=lora_scale(lora_cfg))`` applies it on the fly as
``x @ w + scale * (x @ a) @ b``, so one frozen base model serves every MALT role. ``b`` starts
at zero, so a fresh adapter is the identity (the model's outputs are unchanged). Adapters are
kept in float32 whatever the base ``param_dtype`` (they are the trained "master" weights).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from malt_jax.config import LoraConfig, ModelConfig
from malt_jax.model.llama import LAYER_WEIGHTS, Params, param_shapes, unstack_top

__all__ = ["init_lora", "lora_scale", "merge", "count_params", "adapter_shapes", "abstract_adapter"]


def _check_targets(lora_cfg: LoraConfig) -> None:
    bad = [t for t in lora_cfg.targets if t not in LAYER_WEIGHTS]
    if bad:
        raise ValueError(f"lora.targets: unknown weight {bad[0]!r}; valid targets are {LAYER_WEIGHTS}")
    if not lora_cfg.targets:
        raise ValueError("lora.targets is empty; name at least one of " + ", ".join(LAYER_WEIGHTS))
    if lora_cfg.rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {lora_cfg.rank}")


def adapter_shapes(cfg: ModelConfig, lora_cfg: LoraConfig) -> dict:
    """Expected shapes ``{"layers": {name: {"a": (k, in, r), "b": (k, r, out)}}}``, where k is
    the number of adapted (top) layers."""
    _check_targets(lora_cfg)
    if not 0 <= lora_cfg.top_layers <= cfg.n_layers:
        raise ValueError(f"lora.top_layers must be in [0, {cfg.n_layers}], got {lora_cfg.top_layers}")
    base = param_shapes(cfg)["layers"]
    r = lora_cfg.rank
    k = lora_cfg.top_layers or cfg.n_layers
    return {"layers": {n: {"a": (k, base[n][1], r), "b": (k, r, base[n][2])} for n in lora_cfg.targets}}


def abstract_adapter(cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """A fresh (float32) adapter as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        adapter_shapes(cfg, lora_cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """A fresh adapter: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming-uniform), ``b = 0``."""
    adapter_shapes(cfg, lora_cfg)  # validates the config eagerly (raises naming the bad field)
    return _init_lora(cfg, lora_cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array, dtype: Any) -> Params:
    shapes = adapter_shapes(cfg, lora_cfg)["layers"]
    keys = jax.random.split(key, len(shapes))
    layers = {}
    for k, (name, s) in zip(keys, shapes.items()):
        bound = 1.0 / (s["a"][1] ** 0.5)
        layers[name] = {
            "a": jax.random.uniform(k, s["a"], dtype, -bound, bound),
            "b": jnp.zeros(s["b"], dtype),
        }
    return {"layers": layers}


def lora_scale(lora_cfg: LoraConfig) -> float:
    """The LoRA multiplier ``alpha / rank``."""
    return float(lora_cfg.alpha) / float(lora_cfg.rank)


def merge(params: Params, adapter: Params, scale: float) -> Params:
    """Folds an adapter into a copy of the base weights: ``w + scale * a @ b`` (in float32,
    cast back to each weight's dtype). The result runs without ``lora=`` and can be exported
    with ``weights.save_hf``."""
    layers = dict(params["layers"])
    for name, ab in adapter.get("layers", {}).items():
        w = layers[name]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        top = w[w.shape[0] - delta.shape[0] :]  # adapters may cover only the top layers
        merged = (top.astype(jnp.float32) + scale * delta).astype(w.dtype)
        layers[name] = w.at[w.shape[0] - delta.shape[0] :].set(merged)
    # per-layer copies (llama.unstack_top) are re-made from the merged weights, never kept stale
    return unstack_top({**params, "layers": layers}, len(params.get("layers_top", ())))


def count_params(tree: Any) -> int:
    """Number of scalar parameters in a pytree (e.g. an adapter)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
