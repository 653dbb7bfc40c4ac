"""Devices, meshes and placement: the one table of logical axes that drives every sharding decision
(``sharding``), and multi-process start-up plus host <-> device transfer (``distributed``:
``put``, ``fetch``, ``shard_params``, ``shard_batch``).

Layer 2: may import ``malt_jax.config`` and ``malt_jax.runtime``.
"""
