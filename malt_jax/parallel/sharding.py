"""Device meshes and one table of logical axes that drives every sharding decision.

Arrays are described by *logical* axis names (``"batch"``, ``"embed"``, ``"heads"``...);
``AXIS_RULES`` maps each logical axis to mesh axes. Mesh axes:

* ``data``   – data parallelism (batch);
* ``fsdp``   – fully-sharded data parallelism (batch, and parameters along ``embed``);
* ``tensor`` – tensor parallelism (heads / ffn / vocab), for large models.

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 3 KV
heads on a 4-way tensor axis), so any model runs on any mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from malt_jax.config import MESH_AXES  # the one definition (config validates mesh axes with it)

AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "ffn": ("tensor",),
    "layers": (),
    "seq": (),
    "rank": (),
}

# logical axes of every parameter (see model/llama.py for the layout)
PARAM_AXES: dict[str, Any] = {
    "embed": ("vocab", "embed"),
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
    "layers": {
        "attn_norm": ("layers", None),
        "mlp_norm": ("layers", None),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "wo": ("layers", "heads", "embed"),
        "w_gate": ("layers", "embed", "ffn"),
        "w_up": ("layers", "embed", "ffn"),
        "w_down": ("layers", "ffn", "embed"),
        "bq": ("layers", "heads"),  # Qwen2
        "bk": ("layers", "kv_heads"),
        "bv": ("layers", "kv_heads"),
        "q_norm": ("layers", None),  # Qwen3
        "k_norm": ("layers", None),
    },
}


# LoRA factors: a [L, in, r] keeps the input axis of its base weight, b [L, r, out] the output axis.
def lora_axes(name: str) -> dict[str, tuple]:
    base = PARAM_AXES["layers"][name]
    return {"a": (base[0], base[1], "rank"), "b": (base[0], "rank", base[2])}


V_CACHE_AXES = ("layers", "batch", "kv_heads", "seq", None)
K_CACHE_AXES = ("layers", "batch", "kv_heads", None, "seq")  # keys stored transposed (llama.KVCache)

# logical axes of the activations the model constrains (``constrain``): the residual stream at
# every layer boundary is split over the batch only (replicated over ``tensor``, as in Megatron
# tensor parallelism); attention heads, MLP hidden units and logits are split over ``tensor``.
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "residual": ("batch", "seq", None),  # [B, T, dim]
    "q": ("batch", "seq", "heads", None),  # [B, T, H, hd]
    "kv": ("batch", "seq", "kv_heads", None),  # [B, T, K, hd]
    "ffn": ("batch", "seq", "ffn"),  # [B, T, ffn]
    "logits": ("batch", "seq", "vocab"),  # [B, T, vocab]
    "k_cache": K_CACHE_AXES,  # [L, B, K, hd, S]
    "v_cache": V_CACHE_AXES,  # [L, B, K, S, hd]
    # looked-up embedding rows as the table stores them (width over ``fsdp``): the table is not
    # gathered for a lookup; the rows are then resharded to the residual stream's layout
    "embed_rows": (None, None, "embed"),  # [B, T, dim]
}


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """``x`` with the sharding ``ACTIVATION_AXES[kind]`` asks for on the current mesh (set by
    :func:`mesh_context` / ``jax.set_mesh`` around the traced call); unchanged without a mesh.
    A dimension that does not split evenly stays replicated, as for parameters."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    axes = ACTIVATION_AXES[kind]
    if len(axes) != x.ndim:
        raise ValueError(f"constrain({kind!r}): {len(axes)} logical axes for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def gather_rows_for_head(x: jax.Array, dim: int) -> jax.Array:
    """Hidden states [B, T, dim] about to meet the LM head, for a few tokens (decoding).

    With FSDP the head's weight is split along ``dim``; multiplying batch-split rows would
    gather the whole weight on every device (a vocab x dim copy, hoisted out of each decoding
    loop). When the step has fewer tokens than the model is wide, it is cheaper to gather the
    rows instead, split them along ``dim`` like the weight, and let each device produce partial
    logits that are reduce-scattered. Unchanged without an ``fsdp`` axis or for long inputs."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("fsdp", 1) == 1 or x.ndim != 3 or x.shape[0] * x.shape[1] >= dim:
        return x
    if dim % mesh.shape["fsdp"]:
        return x
    data = "data" if mesh.shape.get("data", 1) > 1 and x.shape[0] % mesh.shape["data"] == 0 else None
    return jax.lax.with_sharding_constraint(x, P(data, None, "fsdp"))


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` (the model's activation constraints follow it), or a no-op."""
    import contextlib

    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_sizes(shape: Mapping[str, int] | Sequence[tuple[str, int]] | None, n_devices: int | None) -> dict[str, int]:
    """Axis sizes ``{data, fsdp, tensor}`` of a mesh shape over ``n_devices``: missing axes get
    size 1; no shape puts every device (``n_devices``, else 1) on ``data``; one axis of -1 takes
    the devices the others leave (it needs ``n_devices``). Does not check the product."""
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}")
    if not shape:
        shape = {"data": n_devices or 1}
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    if -1 in sizes.values():
        if n_devices is None:
            raise ValueError("mesh: an axis of -1 needs --devices")
        rest = int(np.prod([s for s in sizes.values() if s != -1]))
        sizes = {a: (n_devices // rest if s == -1 else s) for a, s in sizes.items()}
    return sizes


def make_mesh(
    shape: Mapping[str, int] | Sequence[tuple[str, int]] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a mesh with axes (data, fsdp, tensor) from :func:`mesh_sizes` of ``shape`` over
    ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(mesh_sizes(shape, len(devices)).values())
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
    """PartitionSpec for an array of ``shape`` with logical ``axes`` (non-divisible -> replicated)."""
    out: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape):
        rules = AXIS_RULES.get(name, ()) if name else ()
        mesh_axes = tuple(a for a in rules if mesh.shape.get(a, 1) > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            out.append(None)
        else:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def sharding_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, shape, mesh))


def param_shardings(params: Any, mesh: Mesh, lora: bool = False) -> Any:
    """NamedShardings for a params pytree (or a LoRA adapter pytree with ``lora=True``)."""
    if lora:
        axes = {"layers": {k: lora_axes(k) for k in params.get("layers", {})}}
    else:
        axes = {
            k: ({n: a for n, a in v.items() if n in params[k]} if isinstance(v, dict) else v)
            for k, v in PARAM_AXES.items()
            if k in params
        }
    return jax.tree.map(
        lambda ax, x: sharding_for(ax, x.shape, mesh), axes, params, is_leaf=lambda t: isinstance(t, tuple)
    )


def batch_shards(mesh: Any) -> int:
    """How many ways a mesh (concrete or abstract) splits the batch: the product of its batch axes."""
    return int(np.prod([mesh.shape.get(a, 1) for a in AXIS_RULES["batch"]]))


def batch_sharding(mesh: Mesh, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Shards the leading (batch) axis of an ``ndim``-dimensional array over data+fsdp (replicated
    when ``shape[0]`` does not split evenly); other axes, and scalars, replicated."""
    if ndim == 0:
        return NamedSharding(mesh, P())
    axes = ("batch",) + (None,) * (ndim - 1)
    shape = shape or (batch_shards(mesh),) + (1,) * (ndim - 1)
    return sharding_for(axes, shape, mesh)
