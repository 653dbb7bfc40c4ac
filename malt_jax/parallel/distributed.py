"""Multi-process (multi-host) start-up and per-process input feeding.

JAX runs one Python process per host (TPU VM worker, GPU node). Every process executes the
same program; :func:`initialize` connects them (``jax.distributed.initialize``) so that
``jax.devices()`` lists the devices of *all* processes and a :class:`jax.sharding.Mesh` built
from it spans the whole slice. Nothing else in malt-jax changes: jitted steps with
``NamedSharding`` in/out shardings run SPMD across processes, and Orbax checkpoints write each
process's shards to a shared directory.

* :func:`initialize` is a no-op for a single process. It is called by ``malt-jax`` at start-up
  when :func:`wants_distributed` is true (env ``MALT_DISTRIBUTED=1``, or a multi-host TPU /
  explicit JAX coordinator environment), so ``tpu_configs/launch.sh`` only has to run the same
  command on every worker.
* :func:`host_local_to_global` turns each process's *slice* of a batch (NumPy, leading axis =
  rows) into one global ``jax.Array`` split over the mesh's batch axes (``data`` x ``fsdp``),
  via ``jax.make_array_from_process_local_data``. Process ``p`` holds global rows
  ``[p * b, (p + 1) * b)`` when the mesh is built from ``jax.devices()`` (process-major order).
* :func:`put` / :func:`fetch` are the one path every stage moves data through between host and
  devices: ``put`` places a host value (the same on every process) with a sharding, also one
  that spans other processes' devices (where ``jax.device_put`` refuses); ``fetch`` brings
  (possibly non-addressable) arrays back to NumPy on every process.

On CPU (tests, debugging) cross-process collectives use Gloo
(``jax_cpu_collectives_implementation="gloo"``, the default of jax 0.10 which we set
explicitly so older defaults do not silently fall back to no collectives).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from malt_jax.parallel.sharding import batch_sharding, param_shardings

__all__ = [
    "initialize",
    "is_initialized",
    "wants_distributed",
    "maybe_initialize_from_env",
    "host_local_to_global",
    "put",
    "fetch",
    "process_index",
    "is_lead",
    "process_count",
    "shard_params",
    "shard_batch",
]

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def is_initialized() -> bool:
    """True once ``jax.distributed.initialize`` has connected this process."""
    try:
        from jax._src import distributed as _d

        return _d.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def wants_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for a multi-process run.

    True for ``MALT_DISTRIBUTED=1`` (what ``tpu_configs/launch.sh`` sets), for an explicit JAX
    coordinator (``JAX_COORDINATOR_ADDRESS``), for a multi-host TPU slice whose runtime exports
    more than one worker (``TPU_WORKER_HOSTNAMES=h0,h1,...``, GKE / queued resources), and for
    multi-slice ``MEGASCALE_COORDINATOR_ADDRESS``. ``MALT_DISTRIBUTED=0`` always wins.
    """
    env = os.environ if env is None else env
    flag = env.get("MALT_DISTRIBUTED", "").strip().lower()
    if flag:
        return flag in _TRUE
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
    initialization_timeout: int = 300,
) -> bool:
    """Connects this process to the others (wraps ``jax.distributed.initialize``).

    Args:
      coordinator: ``host:port`` of process 0's coordinator service. ``None``: taken from
        ``MALT_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS`` or auto-detected by JAX (Cloud TPU
        VMs, Slurm, Open MPI).
      num_processes: total number of processes (``MALT_NUM_PROCESSES`` or auto-detected).
      process_id: this process's rank (``MALT_PROCESS_ID`` or auto-detected).
      local_device_ids: optional restriction to some local devices (GPU nodes).
    Returns:
      True if the process is now part of a multi-process run, False for a no-op (a single
      process: ``num_processes == 1``, or nothing was given and the environment does not
      ask for a distributed run, see :func:`wants_distributed`). Calling it again is harmless.
    """
    if is_initialized():
        return True
    env = os.environ
    coordinator = coordinator or env.get("MALT_COORDINATOR") or None
    if num_processes is None and env.get("MALT_NUM_PROCESSES"):
        num_processes = int(env["MALT_NUM_PROCESSES"])
    if process_id is None and env.get("MALT_PROCESS_ID"):
        process_id = int(env["MALT_PROCESS_ID"])
    if num_processes == 1:
        return False
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not explicit and not wants_distributed():
        return False
    # Cross-process collectives on CPU need an implementation (Gloo ships with jaxlib).
    with contextlib.suppress(AttributeError, KeyError, ValueError):  # pragma: no cover - option absent in this jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
        "initialization_timeout": initialization_timeout,
    }
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def maybe_initialize_from_env() -> bool:
    """:func:`initialize` if :func:`wants_distributed` (called once at ``malt-jax`` start-up)."""
    if not wants_distributed():
        return False
    return initialize()


def process_index() -> int:
    return jax.process_index()


def is_lead() -> bool:
    """True on the process that writes shared files which cannot be written atomically (plots,
    the report, TensorBoard events): process 0."""
    return jax.process_index() == 0


def process_count() -> int:
    return jax.process_count()


def _batch_blocks(sharding: NamedSharding, ndim: int) -> tuple[int, int]:
    """(distinct row blocks held by this process, row blocks in total) of a batch sharding."""
    entry = sharding.spec[0]
    axes = entry if isinstance(entry, tuple) else (entry,)
    n = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    probe = (n,) + (1,) * (ndim - 1)
    local = {idx[0].start for idx in sharding.addressable_devices_indices_map(probe).values() if idx is not None}
    return len(local), n


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
    """Assembles per-process batch slices into global arrays split over ``data`` x ``fsdp``.

    Every leaf of ``batch`` is this process's NumPy slice (leading axis = rows; all processes
    give the same shape). The result is a pytree of global ``jax.Array`` of
    ``rows * (blocks / local blocks)`` rows, sharded like ``sharding.batch_sharding`` (so it
    can be passed straight to a :class:`malt_jax.training.stepper.Stepper` or a jitted sampler). Typed
    PRNG key arrays are supported. With a single process this is a plain sharded
    ``device_put``. Scalars are replicated (every process must pass the same value).

    Raises ValueError if the local row count does not split evenly over the local devices.
    """

    def one(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = one(np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=impl)
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if x.ndim == 0 or sharding.spec[0] is None:  # no batch axis splits it: replicated
            return jax.make_array_from_process_local_data(sharding, x, x.shape)
        local_blocks, blocks = _batch_blocks(sharding, x.ndim)
        if x.shape[0] % local_blocks:
            raise ValueError(
                f"host_local_to_global: {x.shape[0]} local rows do not split over this process's "
                f"{local_blocks} batch shards; use a per-process batch that is a multiple of "
                f"{local_blocks}"
            )
        global_shape = (x.shape[0] * blocks // local_blocks,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


def fetch(tree: Any) -> Any:
    """NumPy copies of (possibly non-fully-addressable) global arrays, on every process.

    Arrays that span several processes are gathered with a collective, so every process must
    call this on the same arrays in the same order (as for any jitted step)."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_shards[0].data)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def put(tree: Any, shardings: Any) -> Any:
    """Places every leaf of ``tree`` with its sharding (one ``Sharding`` or ``Device`` for all, or a
    matching pytree of them), on one process or many.

    Host values (NumPy, Python scalars, arrays on a local device) must be the same on every
    process: each process fills its own devices' shards from its copy. Global arrays already on
    the mesh are resharded. Typed PRNG key arrays are supported; a ``jax.ShapeDtypeStruct``
    gets the sharding (for ahead-of-time lowering)."""
    from jax.sharding import Sharding

    def one(x: Any, s: Any) -> jax.Array | jax.ShapeDtypeStruct:
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract (AOT lowering): the sharding only
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return place(x, s)

    def place(x: Any, s: Any) -> jax.Array:
        if isinstance(s, jax.Device) or s.is_fully_addressable:
            return jax.device_put(x, s)
        if isinstance(x, jax.Array):
            if x.dtype != object and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                impl = jax.random.key_impl(x)
                return jax.random.wrap_key_data(place(jax.random.key_data(x), s), impl=impl)
            if not x.is_fully_addressable:
                return x if x.sharding == s else jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, (Sharding, jax.Device)):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shard_params(params: Any, mesh: Mesh, lora: bool = False) -> Any:
    """Puts a parameter (or LoRA adapter) tree on the mesh, each array sharded as the logical-axis
    table says (``sharding.param_shardings``)."""
    return put(params, param_shardings(params, mesh, lora=lora))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Puts every array of ``tree`` on the mesh with its leading axis split over data+fsdp."""
    return jax.tree.map(lambda x: put(x, batch_sharding(mesh, np.ndim(x), np.shape(x))), tree)
