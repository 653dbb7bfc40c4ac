"""One process of the local multi-host test (tests/test_multihost.py).

Run as ``python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I --out DIR --ckpt DIR`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
and ``JAX_PLATFORMS=cpu``: the processes join one 8-device CPU "slice" with
``malt_jax.parallel.distributed.initialize``, then :func:`compute` runs

* two sharded SFT steps (``malt_jax.training.stepper.Stepper`` on a {data: 2, fsdp: 2, tensor: 2} mesh),
  each process feeding only its half of every batch (``host_local_to_global``);
* a sharded sampling call (``malt_jax.sampling.decode.generate``, batch split over ``data: 8``);
* an Orbax checkpoint save + sharded restore of the train state into a shared directory.

The test imports :func:`compute` and runs it in the (single-process, 8-device) pytest process
as the reference; every process here writes its results to ``OUT/process_<i>.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

CKPT_STEP = 2


def worker_setup():
    import jax
    import jax.numpy as jnp

    from malt_jax.config import LoraConfig, ModelConfig, SamplingConfig, TrainConfig
    from malt_jax.model.llama import init_params
    from malt_jax.training import data as D

    cfg = ModelConfig.tiny(n_layers=1)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    train = TrainConfig(learning_rate=1e-2, warmup_ratio=0.1, batch_size=8, max_seq_len=32, grad_clip=1.0)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    base = jax.tree.map(
        lambda s: (rng.normal(0, 0.3, s.shape) if len(s.shape) > 1 else np.ones(s.shape)).astype(np.float32), shapes
    )
    tok = lambda lo, hi: list(rng.integers(1, 256, rng.integers(lo, hi)))  # noqa: E731
    batches = [D.pack_sft([D.SFTExample(tok(2, 8), tok(2, 9)) for _ in range(8)], train.max_seq_len) for _ in range(2)]
    prompts = np.zeros((8, 8), np.int32)
    lens = rng.integers(2, 8, 8).astype(np.int32)
    for i, n in enumerate(lens):
        prompts[i, :n] = rng.integers(1, 256, n)
    sc = SamplingConfig(temperature=0.8)
    return cfg, lora, train, base, batches, (prompts, lens), sc, jnp


def compute(ckpt_dir: str | None = None) -> dict[str, np.ndarray]:
    """Runs the sharded train/sample/checkpoint workload on ``jax.devices()`` (8 in total, in one
    or several processes) and returns NumPy results (identical on every process)."""
    import jax

    from malt_jax.model.lora import init_lora
    from malt_jax.parallel.distributed import fetch, host_local_to_global
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.runtime.checkpoint import Checkpointer
    from malt_jax.sampling import decode as sampling
    from malt_jax.training.role import Stepper, TrainState, make_optimizer, state_shardings

    cfg, lora, train, base, batches, (prompts, lens), sc, jnp = worker_setup()
    p, n_proc = jax.process_index(), jax.process_count()

    def mine(x):  # this process's slice of the global rows
        rows = x.shape[0] // n_proc
        return x[p * rows : (p + 1) * rows]

    out: dict[str, np.ndarray] = {}
    # -- sharded SFT steps ------------------------------------------------------------------
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    opt = make_optimizer(train, 10)
    stepper = Stepper("sft", cfg, lora, train, opt, mesh=mesh, role="generator")
    b_sh, state = stepper.place(base, TrainState.create(init_lora(cfg, lora, jax.random.key(1)), opt))
    for i, batch in enumerate(batches):
        local = {k: mine(v) for k, v in batch.items()}
        state, metrics = stepper(b_sh, state, host_local_to_global(local, mesh))
        out[f"loss_{i}"] = np.asarray(metrics["loss"])
        out[f"grad_norm_{i}"] = np.asarray(metrics["grad_norm"])
    wq_a = state.adapter["layers"]["wq"]["a"]
    out["wq_a_spec"] = np.asarray(str(wq_a.sharding.spec))
    out["wq_a_local_shards"] = np.asarray(len(wq_a.addressable_shards))
    for name, ab in state.adapter["layers"].items():
        for k, v in fetch(ab).items():
            out[f"adapter/{name}/{k}"] = v

    # -- sharded sampling -------------------------------------------------------------------
    smesh = make_mesh({"data": 8})
    params = jax.device_put(base, jax.sharding.NamedSharding(smesh, jax.sharding.PartitionSpec()))
    keys = sampling.row_keys(7, prompts.shape[0])
    x, n, k = host_local_to_global((mine(prompts), mine(lens), mine(keys)), smesh)
    gen = sampling.generate(params, x, n, k, cfg=cfg, sampling=sc, max_new_tokens=10)
    out["gen_devices"] = np.asarray(len(gen.tokens.sharding.device_set))
    g = fetch({"tokens": gen.tokens, "lengths": gen.lengths, "logps": gen.logps})
    out.update({f"gen_{k}": v for k, v in g.items()})

    # -- checkpoint save + sharded restore (arrays spread over the processes) -----------------
    if ckpt_dir is not None:
        with Checkpointer(ckpt_dir) as ck:
            ck.save(CKPT_STEP, {"state": state}, {"role": "generator", "processes": n_proc})
        fresh = TrainState.create(init_lora(cfg, lora, jax.random.key(99)), opt)
        with Checkpointer(ckpt_dir) as ck:
            restored, meta = ck.restore(
                {"state": fresh}, step=CKPT_STEP, shardings={"state": state_shardings(fresh, mesh)}
            )
        r = restored["state"]
        out["restored_processes"] = np.asarray(meta["processes"])
        out["restored_spec"] = np.asarray(str(r.adapter["layers"]["wq"]["a"].sharding.spec))
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fetch(r)), jax.tree.leaves(fetch(state))))
        out["restore_exact"] = np.asarray(same)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    from malt_jax.parallel.distributed import initialize

    assert initialize(a.coordinator, a.num_processes, a.process_id, initialization_timeout=60)
    import jax

    assert jax.process_count() == a.num_processes, jax.process_count()
    assert jax.device_count() == 4 * a.num_processes and jax.local_device_count() == 4
    res = compute(a.ckpt)
    res["process_index"] = np.asarray(jax.process_index())
    res["config_collectives"] = np.asarray(str(jax.config.jax_cpu_collectives_implementation))
    np.savez(os.path.join(a.out, f"process_{a.process_id}.npz"), **res)
    print(f"process {a.process_id}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
