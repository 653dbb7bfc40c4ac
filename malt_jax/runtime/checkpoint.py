"""Training checkpoints with Orbax: arrays (adapter, optimizer state, ...) plus JSON metadata.

Uses ``orbax.checkpoint.CheckpointManager`` (orbax-checkpoint 0.12) with two items per step:

* ``state`` — ``args.StandardSave`` of the training pytree, stored as a nested dict of string
  keys (optax ``NamedTuple`` states are flattened by key path, e.g.
  ``opt_state/1/0/mu/layers/wq/a``), so no pickle is ever involved;
* ``meta``  — ``args.JsonSave`` of a small dict (stage, step, data position, role, config hash...).

Saves are synchronous and atomic: Orbax writes into a temporary directory and renames it on
success, so an interrupted save never touches the previous checkpoint (leftover temporary
directories are ignored and cleaned up). ``max_to_keep`` (default 2) bounds disk use.

:meth:`Checkpointer.restore` takes the *target* pytree (arrays or ``jax.ShapeDtypeStruct``),
checks every stored tensor's shape against it first — a checkpoint from a different model
shape or LoRA config raises :class:`CheckpointError` naming the tensor — and restores each
array directly into the target's sharding (or explicitly given ``shardings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "flatten_named", "FORMAT"]

FORMAT = "malt-jax-train-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing or does not match the expected training state."""


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_named(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path_name, leaf), ...], treedef)`` with names like ``adapter/layers/wq/a``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves], treedef


def _nest(named: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for name, leaf in named:
        node = out
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def _walk(md: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(md, Mapping) or (hasattr(md, "items") and not hasattr(md, "shape")):
        out: dict[str, Any] = {}
        for k, v in md.items():
            out.update(_walk(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: md}


def _get(tree: dict, name: str) -> Any:
    for p in name.split("/"):
        tree = tree[p]
    return tree


class Checkpointer:
    """Orbax-backed checkpoints of a training pytree plus JSON metadata, in ``directory``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    # -- queries ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        self._mgr.reload()
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return list(self._mgr.all_steps())

    def _step(self, step: int | None) -> int:
        s = self.latest_step() if step is None else step
        if s is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if s not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {s} in {self.directory} (have {self.all_steps()})")
        return s

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved with a checkpoint (latest if ``step`` is None)."""
        s = self._step(step)
        return dict(self._mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def stored_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
        """``{tensor name: shape}`` as stored on disk."""
        s = self._step(step)
        md = self._mgr.item_metadata(s)["state"]
        return {k: tuple(v.shape) for k, v in _walk(md).items()}

    # -- save / restore --------------------------------------------------------------------

    def save(self, step: int, tree: Any, metadata: Mapping[str, Any]) -> None:
        """Saves ``tree`` (any pytree of arrays) and JSON ``metadata`` as checkpoint ``step``."""
        named, _ = flatten_named(tree)
        meta = {"format": FORMAT, **metadata}
        self._mgr.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(_nest(named)), meta=ocp.args.JsonSave(meta))
        )
        self._mgr.wait_until_finished()

    def restore(self, target: Any, step: int | None = None, shardings: Any = None) -> tuple[Any, dict]:
        """Restores checkpoint ``step`` (latest by default) into the structure of ``target``.

        Args:
          target: pytree of ``jax.Array`` / ``jax.ShapeDtypeStruct`` / ``np.ndarray`` leaves
            giving the expected structure, shapes, dtypes and (for jax leaves) shardings.
          shardings: optional pytree (same structure) of ``jax.sharding.Sharding`` overriding
            the target's shardings.
        Returns:
          (the restored pytree, the metadata dict).
        Raises:
          CheckpointError naming the first tensor whose shape differs or that is missing.
        """
        s = self._step(step)
        stored = self.stored_shapes(s)
        named, treedef = flatten_named(target)
        sh = [x for _, x in flatten_named(shardings)[0]] if shardings is not None else [None] * len(named)
        if len(sh) != len(named):
            raise CheckpointError("restore: shardings do not match the target's structure")
        for name, leaf in named:
            want = tuple(np.shape(leaf))
            if name not in stored:
                raise CheckpointError(
                    f"{self.directory} step {s}: checkpoint has no tensor {name!r} (expected shape {want}); "
                    "it was written for a different LoRA / optimizer configuration"
                )
            if stored[name] != want:
                raise CheckpointError(
                    f"{self.directory} step {s}: tensor {name!r} has shape {stored[name]} in the checkpoint "
                    f"but {want} is expected; the checkpoint comes from a different model shape or LoRA "
                    "rank (use a fresh checkpoint directory)"
                )
        extra = sorted(set(stored) - {n for n, _ in named})
        if extra:
            raise CheckpointError(
                f"{self.directory} step {s}: checkpoint tensor {extra[0]!r} is not part of the expected "
                "state; it was written for a different LoRA / optimizer configuration"
            )

        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract: list[tuple[str, np.ndarray | jax.ShapeDtypeStruct]] = []
        for (name, leaf), shard in zip(named, sh):
            if isinstance(leaf, np.ndarray) and shard is None:
                abstract.append((name, leaf))
                continue
            shard = shard or getattr(leaf, "sharding", None) or default
            abstract.append((name, jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=shard)))
        out = self._mgr.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(_nest(abstract)), meta=ocp.args.JsonRestore())
        )
        leaves = [_get(out["state"], name) for name, _ in named]
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(out["meta"])

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
