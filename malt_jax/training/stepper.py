"""The compiled, optionally sharded SFT/DPO step (:class:`Stepper`) and its host-side NaN/Inf guard.

With a mesh the step is jitted with ``in_shardings``/``out_shardings``: base params by
``sharding.param_shardings`` (fsdp over embed, tensor over heads/ffn), the adapter and its
optimizer moments by the LoRA shardings (:func:`state_shardings`), scalars replicated, batches
split over ``data`` x ``fsdp``. Compilations are cached, so stages and roles with the same shapes
share them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from malt_jax.config import LoraConfig, ModelConfig, TrainConfig
from malt_jax.model.llama import Params, abstract_params, unstack_top
from malt_jax.model.lora import lora_scale
from malt_jax.parallel.distributed import fetch, put
from malt_jax.parallel.sharding import batch_sharding, mesh_context, param_shardings
from malt_jax.runtime.checkpoint import flatten_named
from malt_jax.training import data as data_lib
from malt_jax.training.steps import ROW_KEYS, SHARED_KEYS, StepConfig, TrainState, abstract_state, dpo_step, sft_step

__all__ = ["NonFiniteError", "state_shardings", "Stepper"]


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/Inf; the offending update was not applied.

    ``state`` holds the (unchanged) training state, ``metrics`` the step's metrics.
    """

    def __init__(self, message: str, state: Any = None, metrics: dict | None = None):
        super().__init__(message)
        self.state = state
        self.metrics = metrics


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for a TrainState: the adapter by the LoRA rules, optimizer moments like the
    adapter leaf they mirror (matched by key-path suffix and shape), everything else replicated."""
    rep = NamedSharding(mesh, P())
    ad_sh = param_shardings(state.adapter, mesh, lora=True)
    by_name = {
        name: (sh, tuple(np.shape(leaf)))
        for (name, sh), (_, leaf) in zip(flatten_named(ad_sh)[0], flatten_named(state.adapter)[0])
    }

    def opt_leaf(path: Any, leaf: Any) -> NamedSharding:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for ad_name, (sh, shape) in by_name.items():
            if (name == ad_name or name.endswith("/" + ad_name)) and tuple(np.shape(leaf)) == shape:
                return sh
        return rep

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state)
    return TrainState(step=rep, adapter=ad_sh, opt_state=opt_sh)


_NDIM = {"hidden": 3, "score_index": 3, "score_targets": 3, "score_mask": 3}


def step_base(base: Params, cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig) -> Params:
    """The base params a single-device CPU training run steps with: per-layer copies of the
    adapted layers' weights (``llama.unstack_top``) when ``train.unstack_layers`` is on, the
    params have layers, and the backend is CPU (on TPU/GPU a layer read from the stacked arrays
    costs no copy, and the scan compiles faster). Unchanged otherwise."""
    if not (train_cfg.unstack_layers and "layers" in base and jax.default_backend() == "cpu"):
        return base
    n = lora_cfg.top_layers or cfg.n_layers
    return unstack_top(base, min(n, cfg.n_layers))


def _batch_shardings(
    kind: str, rows: int, mesh: Mesh, keys: Sequence[str] = ("tokens", "targets", "loss_mask")
) -> tuple:
    rows2 = 2 * rows if kind == "dpo" else rows
    shared = "segments" in keys  # data.pack_dpo_shared: one row per pair
    n = rows if shared else rows2
    b = {
        k: batch_sharding(mesh, _NDIM.get(k, 2), (n, 1, 1)[: _NDIM.get(k, 2)])
        for k in (SHARED_KEYS if shared else ROW_KEYS)
        if k in keys
    }
    b["weights"] = batch_sharding(mesh, 1, (rows,))
    if kind == "dpo":
        return b, batch_sharding(mesh, 1, (rows2,))
    return (b,)


@functools.lru_cache(maxsize=32)
def _compiled(
    kind: str,
    cfg: ModelConfig,
    lora_cfg: LoraConfig,
    sc: StepConfig,
    batch_size: int,
    update: optax.TransformUpdateFn,
    state_abs: Any,
    mesh: Mesh | None,
    donate: bool,
    keys: tuple[str, ...] = ("tokens", "targets", "loss_mask"),
) -> Any:
    """The jitted (and, with a mesh, sharded) step; cached so stages/roles share compilations."""
    fn = sft_step if kind == "sft" else dpo_step
    part = functools.partial(fn, cfg=cfg, sc=sc, update=update, scale=lora_scale(lora_cfg))
    donate_argnums = (1,) if donate else ()
    if mesh is None:
        return jax.jit(part, donate_argnums=donate_argnums)
    base_abs = abstract_params(cfg)
    st_sh = state_shardings(state_abs.tree, mesh)
    in_sh = (param_shardings(base_abs, mesh), st_sh, *_batch_shardings(kind, batch_size, mesh, keys))
    return jax.jit(
        part, in_shardings=in_sh, out_shardings=(st_sh, NamedSharding(mesh, P())), donate_argnums=donate_argnums
    )


class _Hashable:
    """Wraps an abstract pytree so it can key an lru_cache (by structure, shapes and dtypes)."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashable) and self._key == other._key


class Stepper:
    """A compiled (optionally sharded) SFT or DPO step plus the host-side NaN/Inf guard.

    ``stepper(base, state, batch[, ref_logps]) -> (state, metrics as Python floats)``; raises
    :class:`NonFiniteError` (naming ``role``, the stage and the step) instead of returning a
    non-finite update. With ``mesh``, inputs are placed on it (base/state should already be
    sharded as :func:`state_shardings` / ``param_shardings`` say, e.g. via :meth:`place`).
    """

    def __init__(
        self,
        kind: str,
        cfg: ModelConfig,
        lora_cfg: LoraConfig,
        train_cfg: TrainConfig,
        optimizer: optax.GradientTransformation,
        mesh: Mesh | None = None,
        role: str = "role",
        donate: bool = False,
    ):
        if kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
        if train_cfg.batch_size % max(train_cfg.grad_accum, 1):
            raise ValueError(
                f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                f"train.grad_accum={train_cfg.grad_accum} (batch_size counts examples per update)"
            )
        self.kind, self.role, self.mesh, self.optimizer = kind, role, mesh, optimizer
        self.cfg, self.lora_cfg, self.train_cfg = cfg, lora_cfg, train_cfg
        self._state_abs = _Hashable(abstract_state(cfg, lora_cfg, optimizer))
        self._donate = donate

    def place(self, base: Params, state: TrainState) -> tuple[Params, TrainState]:
        """Puts base params and state on the mesh with the step's shardings (without a mesh: on
        the default device, committed, so fresh and restored states hit the same compilation,
        and with :func:`step_base`'s per-layer copies)."""
        if self.mesh is None:
            dev = jax.devices()[0]
            base = step_base(jax.device_put(base, dev), self.cfg, self.lora_cfg, self.train_cfg)
            return base, jax.device_put(state, dev)
        return put(base, param_shardings(base, self.mesh)), put(state, state_shardings(state, self.mesh))

    def _step_and_args(self, batch: dict, ref_logps: Any) -> tuple[Any, list[Any]]:
        if "comp_index" not in batch and isinstance(batch.get("loss_mask"), np.ndarray):
            # host batches only: a batch already placed as a global array (multi-host) may not be
            # fetchable here, and is scored at every position (the same losses)
            batch = dict(batch)
            batch["comp_index"], batch["comp_valid"] = data_lib.completion_index(batch["loss_mask"])
        keys = tuple(k for k in (SHARED_KEYS if "segments" in batch else ROW_KEYS) if k in batch)
        fn = _compiled(
            self.kind,
            self.cfg,
            self.lora_cfg,
            StepConfig.of(self.train_cfg),
            self.train_cfg.batch_size,
            self.optimizer.update,
            self._state_abs,
            self.mesh,
            self._donate,
            keys,
        )
        args: list[Any] = [batch] if self.kind == "sft" else [batch, ref_logps]
        if self.mesh is not None:
            args = [
                put(a, s) for a, s in zip(args, _batch_shardings(self.kind, self.train_cfg.batch_size, self.mesh, keys))
            ]
        return fn, args

    def lower(self, base: Params, state: TrainState, batch: dict, ref_logps: Any = None) -> Any:
        """The step lowered for these inputs (``jax.stages.Lowered``: ``.compile()``,
        ``.as_text()``, shardings, memory analysis), exactly as :meth:`__call__` runs it."""
        fn, args = self._step_and_args(batch, ref_logps)
        with mesh_context(self.mesh):
            return fn.lower(base, state, *args)

    def __call__(
        self, base: Params, state: TrainState, batch: dict, ref_logps: Any = None
    ) -> tuple[TrainState, dict[str, float]]:
        """One update. ``batch``: ``data.pack_*`` output, optionally with the ``ROW_KEYS`` extras
        (``comp_index``/``comp_valid`` are added here to a host batch that lacks them)."""
        fn, args = self._step_and_args(batch, ref_logps)
        step = int(fetch(state.step))
        with mesh_context(self.mesh):  # the model's activation constraints follow the mesh
            new_state, metrics = fn(base, state, *args)
        host = {k: float(v) for k, v in fetch(metrics).items()}
        if not host.pop("finite"):
            raise NonFiniteError(
                f"role {self.role!r}: non-finite {self.kind.upper()} loss at step {step} "
                f"(loss={host['loss']}, grad_norm={host['grad_norm']}); the update was NOT applied and the "
                "last checkpoint is intact. Lower the learning rate or check the batch for bad values.",
                state=new_state,
                metrics=host,
            )
        return new_state, host
