"""Ahead-of-time compilation of what the plan models, from abstract shapes (nothing allocated):
the sharded SFT/DPO step (:func:`compile_step`), the RL policy-gradient update
(:func:`compile_pg_step`) and one expansion batch (:func:`compile_expansion`),
for XLA's ``memory_analysis`` / ``cost_analysis`` next to the plan (tests/test_plan.py,
bench/plan_vs_compiler.py, tpu_configs/README.md).

XLA's ``cost_analysis`` counts a ``scan`` body once, so the full model's FLOPs cannot be measured
by compiling it; :func:`one_layer_check` (``malt-jax plan --compile``) compiles a 1-layer version of
the step instead and reports its FLOPs next to the analytic 1-layer number. XLA:CPU computes
bfloat16 dots with a bf16 result (the attention's) in float32 on float32 copies of their operands,
so its memory numbers are an upper bound for TPU/GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from malt_jax.config import RunConfig
from malt_jax.planning.flops import analytic_step_flops

__all__ = ["abstract", "compile_step", "compile_pg_step", "compile_expansion", "compiled_bytes", "one_layer_check"]


def abstract(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes carrying ``shardings``."""
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(cfg: RunConfig, kind: str, mesh: Any) -> Any:
    """AOT-compiles the sharded SFT or DPO step of one microbatch (``batch_size / grad_accum``
    examples; DPO: pairs) of ``cfg`` on ``mesh`` from abstract shapes (nothing is allocated):
    the executable ``Stepper`` runs, for ``memory_analysis()`` / ``cost_analysis()``."""
    import jax
    import jax.numpy as jnp

    from malt_jax.model.llama import abstract_params
    from malt_jax.parallel.sharding import param_shardings
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.stepper import Stepper, state_shardings
    from malt_jax.training.steps import ROW_KEYS, abstract_state

    t = cfg.train
    micro = max(t.batch_size // max(t.grad_accum, 1), 1)
    t = dataclasses.replace(t, grad_accum=1, batch_size=micro)
    opt = make_optimizer(t, 100)
    params = abstract_params(cfg.model)
    state = abstract_state(cfg.model, cfg.lora, opt)
    rows, T = micro * (2 if kind == "dpo" else 1), t.max_seq_len
    dtypes = {
        "tokens": jnp.int32,
        "targets": jnp.int32,
        "loss_mask": jnp.float32,
        "comp_index": jnp.int32,
        "comp_valid": jnp.bool_,
    }
    if kind == "dpo" and t.dpo_shared_prompt:  # data.pack_dpo_shared: a pair's row holds up to 2T tokens
        i32, f32 = jnp.int32, jnp.float32
        batch = {k: jax.ShapeDtypeStruct((micro, 2 * T), i32) for k in ("tokens", "positions", "segments")}
        batch |= {k: jax.ShapeDtypeStruct((micro, 2, T), i32) for k in ("score_index", "score_targets")}
        batch["score_mask"] = jax.ShapeDtypeStruct((micro, 2, T), f32)
    else:
        batch = {k: jax.ShapeDtypeStruct((rows, T), dtypes[k]) for k in ROW_KEYS if k in dtypes}
    batch["weights"] = jax.ShapeDtypeStruct((micro,), jnp.float32)
    stepper = Stepper(kind, cfg.model, cfg.lora, t, opt, mesh=mesh)
    ref = jax.ShapeDtypeStruct((rows,), jnp.float32) if kind == "dpo" else None
    lowered = stepper.lower(
        abstract(params, param_shardings(params, mesh)), abstract(state, state_shardings(state, mesh)), batch, ref
    )
    return lowered.compile()


def compile_pg_step(cfg: RunConfig, mesh: Any, prompt_tokens: int = 256, turn_tokens: int = 32) -> Any:
    """AOT-compiles the sharded policy-gradient update ``malt-jax rl`` runs (``pg_step`` as
    ``stages.rl.update_role`` compiles it) for one microbatch of ``rl.micro_batch`` rows of the
    plan's RL row length and scored width (``flops.rl_row_shapes``: the longest trained role's),
    with the reference (and, with several updates, behaviour) log-probs, on ``mesh`` from abstract
    shapes (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from malt_jax.model.llama import abstract_params
    from malt_jax.model.lora import lora_scale
    from malt_jax.parallel.sharding import mesh_context, param_shardings
    from malt_jax.planning.flops import rl_row_shapes
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.pg_step import PGConfig, compiled_pg_step, pg_batch_shardings
    from malt_jax.training.stepper import _Hashable, state_shardings
    from malt_jax.training.steps import abstract_state

    rl = cfg.rl
    shapes = rl_row_shapes(cfg, prompt_tokens, turn_tokens)
    trained = [r for r in ("G", "V", "R") if r in rl.roles]
    T, C, rows = max(shapes[r][1] for r in trained), max(shapes[r][2] for r in trained), rl.micro_batch
    opt = make_optimizer(cfg.train, 100, rl.learning_rate)
    params = abstract_params(cfg.model)
    state = abstract_state(cfg.model, cfg.lora, opt)
    i32, f32 = jnp.int32, jnp.float32
    dtypes = {"tokens": i32, "targets": i32, "loss_mask": f32, "comp_index": i32, "comp_valid": f32, "adv": f32}
    dtypes |= {"old": f32} if rl.updates_per_iteration > 1 else {}
    dtypes |= {"ref": f32}
    width = {"tokens": T, "targets": T, "loss_mask": T}
    signature = tuple((k, rows, 1 if k == "adv" else 2) for k in dtypes)
    b_sh = pg_batch_shardings(mesh, signature)
    batch = {
        k: jax.ShapeDtypeStruct((rows,) if k == "adv" else (rows, width.get(k, C)), dt, sharding=b_sh[k])
        for k, dt in dtypes.items()
    }
    pc = PGConfig(float(rl.clip_eps), float(rl.kl_coef), rl.loss_agg, 1, float(cfg.sampling.temperature))
    step = compiled_pg_step(cfg.model, lora_scale(cfg.lora), pc, opt.update, mesh, _Hashable(state), signature)
    with mesh_context(mesh):
        lowered = step.lower(
            abstract(params, param_shardings(params, mesh)), abstract(state, state_shardings(state, mesh)), batch
        )
    return lowered.compile()


def compile_expansion(
    cfg: RunConfig, mesh: Any, prompt_tokens: int = 256, turn_tokens: int = 32, mode: str = "extend"
) -> Any:
    """AOT-compiles the trajectory expansion the plan's ``sample`` phase describes: one batch of
    ``tree.questions_per_batch`` questions of ``prompt_tokens``, expanded ``n x m x l`` in the
    chat framing (one growing cache, forked per level) with ``turn_tokens`` per role turn and
    ``sampling.max_new_tokens`` per role, sharded on ``mesh``; abstract shapes only. ``mode="fork"``:
    the RL rollout's (``rl_sample``): one adapter per role (each level's parents re-encoded with
    it, then their caches forked)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from malt_jax.model.llama import abstract_params
    from malt_jax.model.lora import lora_scale
    from malt_jax.parallel.sharding import batch_sharding, mesh_context, param_shardings
    from malt_jax.sampling.expansion import ExpansionSpec, expand

    params = abstract_params(cfg.model)
    Q, tr, mx = cfg.tree.questions_per_batch, cfg.tree, cfg.sampling.max_new_tokens
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), Q))
    rep = NamedSharding(mesh, P())
    spec = ExpansionSpec(n=tr.n, m=tr.m, l=tr.l, max_new=(mx, mx, mx), sampling=cfg.sampling, mode=mode)  # type: ignore[arg-type]
    adapters: tuple = (None, None, None)
    if mode != "extend":
        from malt_jax.model.lora import abstract_adapter

        ad = abstract_adapter(cfg.model, cfg.lora)
        adapters = tuple(abstract(ad, param_shardings(ad, mesh, lora=True)) for _ in range(3))
    with mesh_context(mesh):
        lowered = expand.lower(
            abstract(params, param_shardings(params, mesh)),
            adapters,
            jax.ShapeDtypeStruct((Q, prompt_tokens), jnp.int32, sharding=batch_sharding(mesh, 2, (Q, prompt_tokens))),
            jax.ShapeDtypeStruct((Q,), jnp.int32, sharding=batch_sharding(mesh, 1, (Q,))),
            tuple(jax.ShapeDtypeStruct((turn_tokens,), jnp.int32, sharding=rep) for _ in range(2)),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=batch_sharding(mesh, 1, (Q,))),
            cfg=cfg.model,
            spec=spec,
            lora_scale=lora_scale(cfg.lora),
        )
    return lowered.compile()


def compiled_bytes(compiled: Any) -> int:
    """Per-device peak of an executable by XLA's ``memory_analysis``: arguments + outputs +
    temporaries - what outputs alias from arguments."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def one_layer_check(cfg: RunConfig, sizes: dict[str, int], n_dev: int) -> dict[str, Any]:
    """AOT-compiles a 1-layer version of the sharded SFT step (one microbatch) from abstract
    shapes on the first ``n_dev`` local devices; returns cost/memory analysis."""
    import time

    import jax

    from malt_jax.parallel.sharding import make_mesh

    have = jax.device_count()
    if have < n_dev:
        return {
            "error": f"the mesh needs {n_dev} devices but only {have} are visible (run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} JAX_PLATFORMS=cpu)"
        }
    t = cfg.train
    micro = max(t.batch_size // max(t.grad_accum, 1), 1)
    one = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, n_layers=1),
        lora=dataclasses.replace(cfg.lora, top_layers=0),
        train=dataclasses.replace(t, grad_accum=1, batch_size=micro),
    )
    t0 = time.perf_counter()
    compiled = compile_step(one, "sft", make_mesh(sizes, jax.devices()[:n_dev]))
    dt = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {
        "devices": n_dev,
        "platform": jax.devices()[0].platform,
        "compile_s": dt,
        "flops": float((cost or {}).get("flops", 0.0)),
        "analytic_flops": analytic_step_flops(one, micro) / n_dev,
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0) or 0),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0) or 0),
    }
