"""Per-device memory and FLOP plan of a run on a mesh, without the hardware (``malt-jax plan``).

:func:`make_plan` models, per device, the bytes of the frozen parameters plus those of each phase:
sampling (the ``G -> V -> R`` expansion tree's KV cache, prefill, decoding logits, compaction
copies, gathered fsdp layers), the SFT step and the DPO step (adapter, gradients, Adam moments,
saved activations, remat-aware, and float32 logits of one microbatch). Shapes are abstract
(``jax.eval_shape``) and shardings come from ``sharding.py`` on an ``AbstractMesh``, so a 64-chip
plan runs on a laptop and nothing is allocated. A phase fits if ``parameters + its components <=
usable * device_memory``; otherwise the plan is refused, naming the overflowing component and
what to change. FLOPs per train step are analytic (``flops.analytic_step_flops``).

The formulas and their check against XLA's ``memory_analysis`` (``aot.py``) are in
tpu_configs/README.md; the :class:`~malt_jax.planning.plan.Plan` it returns, its table and
refusal are ``plan.py``, the inputs (``--mesh``, overlays) ``units.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from malt_jax.config import RunConfig
from malt_jax.planning.aot import one_layer_check
from malt_jax.planning.flops import analytic_step_flops, lora_params, rl_iteration_flops, rl_row_shapes
from malt_jax.planning.plan import DEFAULT_DEVICE, DEVICE_HBM, USABLE_FRACTION, Plan
from malt_jax.planning.units import mesh_str, parse_bytes, parse_mesh

__all__ = ["make_plan"]


def _abstract_mesh(shape: Mapping[str, int]) -> Any:
    from jax.sharding import AbstractMesh

    from malt_jax.parallel.sharding import MESH_AXES

    return AbstractMesh(tuple(int(shape[a]) for a in MESH_AXES), MESH_AXES)


def _sharded_bytes(tree: Any, shardings: Any) -> int:
    import jax

    return int(
        sum(
            int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
            for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
        )
    )


def _tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _split(n_rows: int, mesh: Any) -> int:
    """Rows per device of a batch-sharded array (replicated when not divisible, as in spec_for)."""
    from malt_jax.parallel.sharding import spec_for

    spec = spec_for(("batch",), (n_rows,), mesh)
    if spec[0] is None:
        return n_rows
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return n_rows // int(np.prod([mesh.shape[a] for a in axes]))


def _div(n: int, tp: int) -> int:
    """Per-device share of a dimension split over ``tensor`` (replicated when not divisible)."""
    return n // tp if tp > 1 and n % tp == 0 else n


def _mesh_sizes(
    cfg: RunConfig, mesh: Mapping[str, int] | str | None, devices: int | None
) -> tuple[dict[str, int], int]:
    """(axis sizes, device count) of ``mesh`` (default ``cfg.mesh``), checked against ``devices``."""
    from malt_jax.parallel.sharding import mesh_sizes

    sizes = mesh_sizes(parse_mesh(mesh) if mesh is not None else dict(cfg.mesh), devices)
    n_dev = int(np.prod(list(sizes.values())))
    if devices is not None and n_dev != devices:
        raise ValueError(f"mesh {mesh_str(sizes)} has {n_dev} devices but --devices is {devices}")
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"mesh {mesh_str(sizes)}: sizes must be >= 1")
    return sizes, n_dev


def _device_memory(device: str | None, device_memory: int | str | None) -> tuple[str, int]:
    """(device name, bytes per device): ``device_memory`` if given, else the device's HBM."""
    if device_memory is not None:
        return device or "custom", parse_bytes(device_memory)
    device = device or DEFAULT_DEVICE
    if device not in DEVICE_HBM:
        raise ValueError(
            f"--device: unknown device {device!r}; choose from {sorted(DEVICE_HBM)} or give --device-memory"
        )
    return device, DEVICE_HBM[device]


def _notes(cfg: RunConfig, rows: int, micro: int, shards: int, S: int) -> list[str]:
    """Warnings about the config that do not make it refused."""
    t = cfg.train
    T, accum = t.max_seq_len, max(int(t.grad_accum), 1)
    notes = []
    if S > T:
        notes.append(
            f"KV cache length {S} > train.max_seq_len {T}: refiner SFT/DPO examples (prompt + G + V + R) "
            "will be truncated; raise train.max_seq_len"
        )
    dpo_rows = micro if t.dpo_shared_prompt else 2 * micro
    for name, r in (("sampling rows", rows), ("SFT microbatch", micro), ("DPO microbatch rows", dpo_rows)):
        if shards > 1 and r % shards:
            notes.append(f"{name} ({r}) not divisible by data*fsdp = {shards}: that batch is replicated, not split")
    if t.batch_size % accum:
        notes.append(
            f"train.batch_size {t.batch_size} is not a multiple of train.grad_accum {accum} (the trainer "
            "will refuse it)"
        )
    return notes


def _rl_components(
    cfg: RunConfig,
    c: dict[str, int],
    phases: dict[str, tuple[str, ...]],
    amesh: Any,
    adapter_dev: int,
    opt_dev: int,
    saved: Any,
    layer_bytes: tuple[int, int],
    prompt_tokens: int,
    turn_tokens: int,
) -> dict[str, Any]:
    """Adds the RL run's components and its two phases to ``c`` / ``phases``; returns its details.

    ``rl_sample`` (the rollout) is the expansion's ``sample`` phase (planned for
    ``tree.questions_per_batch`` questions; an RL iteration samples ``min(questions_per_batch,
    rl.questions_per_iteration)`` at a time, so it is an upper bound) with the rollout's own
    prefill, ``prefill_rl``, plus ``rl_states``: the trained roles' current adapters and Adam
    moments (and the reference's copies with ``rl.reference: sft``) held besides the 3 start
    adapters. The rollout samples with one adapter per role (``expand`` mode "fork"; "naive"
    without ``tree.share_prefix``): in the chat framing every level re-encodes its parents'
    contexts (all its rows' in "naive") with its adapter, each a row of the full cache width ``S``
    attending ``S`` + the level's cache slots (float32 scores and probabilities, no flash
    attention), one layer at a time, with the parents' fresh cache alive, before their caches
    are forked: ``prefill_rl`` is the largest level's excess over the decoding's components
    (never alive together). The separate framing encodes each output once per node (no such
    re-encoding): there ``prefill_rl`` is the expansion's ``prefill``. ``rl_update`` is one compiled
    policy-gradient update of ``rl.micro_batch`` rows (``pg_step``): the stepped role's adapter,
    gradients (summed over the microbatches) and optimizer, the gathered fsdp weights, saved
    activations of rows of the longest role's length ``T``, float32 logits of its ``C`` scored
    positions (``logits_rl``), plus ``rl_batch`` (the role's whole batch with its reference /
    behaviour log-probs, on the devices during its updates) and ``rl_held`` (every other adapter
    and optimizer state the run keeps alive, outside the compiled step)."""
    m, rl = cfg.model, cfg.rl
    shapes = rl_row_shapes(cfg, prompt_tokens, turn_tokens)
    trained = [r for r in ("G", "V", "R") if r in rl.roles]
    T = max(shapes[r][1] for r in trained)
    C = max(shapes[r][2] for r in trained)
    n_rows = max(shapes[r][0] for r in trained)  # the largest role batch (rows padded to micro_batch)
    micro = rl.micro_batch
    dev = _split(micro, amesh)
    Vd = _div(m.vocab_size, amesh.shape["tensor"])
    accum = max(shapes[r][0] // micro for r in trained)
    ref_copies = 3 * adapter_dev if rl.reference == "sft" else 0
    # float32 logits of the scored positions / temperature, their log-softmax, the entropy's
    # probabilities and the backward's softmax: 4 [C, vocab] float32 arrays per row
    logits_row = C * Vd * 4 * 4
    c["rl_states"] = len(trained) * (adapter_dev + opt_dev) + ref_copies
    if cfg.task.framing == "chat":
        tr, budgets = cfg.tree, cfg.sampling.budgets()
        Qs = tr.questions_per_batch  # as the sample phase's components (an upper bound, see above)
        sizes = [prompt_tokens + sum(budgets[: i + 1]) + i * turn_tokens for i in range(3)]
        width = sizes[-1]  # the context rows are as wide as the last level's cache
        rows = [Qs, Qs * tr.n, Qs * tr.n * tr.m, Qs * tr.n * tr.m * tr.l]
        encoded = rows[:3] if tr.share_prefix else rows[1:]
        per_token, per_score = layer_bytes
        prefill = max(
            _split(r, amesh) * width * (per_token + per_score * (sizes[i] + width)) for i, r in enumerate(encoded)
        )
        c["prefill_rl"] = max(0, prefill - c["kv_cache"] - c["kv_compacted"] - c["decode_logits"])
    else:
        c["prefill_rl"] = c["prefill"]
    c["gradients_rl"] = adapter_dev * (2 if accum > 1 else 1)
    c["activations_rl"] = saved(dev, T, logits_row)
    c["logits_rl"] = dev * logits_row
    n_logps = 2 if rl.updates_per_iteration > 1 else 1
    row_bytes = T * (4 + 4 + 4) + C * (4 + 4 + 4 * n_logps) + 4  # tokens, targets, mask; index, valid, logps; adv
    c["rl_batch"] = _split(n_rows, amesh) * row_bytes
    c["rl_held"] = 3 * adapter_dev + (len(trained) - 1) * (adapter_dev + opt_dev) + ref_copies
    phases["rl_sample"] = tuple(p if p != "prefill" else "prefill_rl" for p in phases["sample"]) + ("rl_states",)
    phases["rl_update"] = (
        "adapter",
        "gradients_rl",
        "optimizer",
        "fsdp_gather",
        "activations_rl",
        "logits_rl",
        "rl_batch",
        "rl_held",
    )
    return {
        "rl_rows": {r: shapes[r][0] for r in trained},
        "rl_seq_len": T,
        "rl_scored": C,
        "rl_micro_batch": micro,
        "rl_rows_per_device": dev,
        "rl_questions": rl.questions_per_iteration,
        "rl_sample_questions": min(cfg.tree.questions_per_batch, rl.questions_per_iteration),
    }


def make_plan(
    cfg: RunConfig,
    mesh: Mapping[str, int] | str | None = None,
    devices: int | None = None,
    device: str | None = None,
    device_memory: int | str | None = None,
    usable: float = USABLE_FRACTION,
    prompt_tokens: int = 256,
    turn_tokens: int = 32,
    compile: bool = False,
) -> Plan:
    """Builds the per-device plan of ``cfg`` on ``mesh`` (default: ``cfg.mesh``, else all
    ``devices`` on ``data``). ``device`` picks the HBM size from :data:`DEVICE_HBM` unless
    ``device_memory`` is given. Nothing is allocated; the model is described in tpu_configs/README.md."""
    import jax
    import jax.numpy as jnp

    from malt_jax.model.llama import abstract_params
    from malt_jax.parallel.sharding import batch_shards, param_shardings
    from malt_jax.sampling.decode import MIN_COMPACT_ROWS
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.stepper import state_shardings
    from malt_jax.training.steps import abstract_state

    sizes, n_dev = _mesh_sizes(cfg, mesh, devices)
    amesh = _abstract_mesh(sizes)
    device, mem = _device_memory(device, device_memory)
    if not 0 < usable <= 1:
        raise ValueError(f"usable fraction must be in (0, 1], got {usable}")

    m, t, tr, lo = cfg.model, cfg.train, cfg.tree, cfg.lora
    L, D, H, K, hd, F, V = m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.hidden_dim, m.vocab_size
    b = jnp.dtype(m.dtype).itemsize
    tp = sizes["tensor"]
    Hd, Kd, Fd, Vd = _div(H, tp), _div(K, tp), _div(F, tp), _div(V, tp)

    # -- abstract state: params, adapter, optimizer ----------------------------------------
    params = abstract_params(m)
    p_sh = param_shardings(params, amesh)
    c: dict[str, int] = {"parameters": _sharded_bytes(params, p_sh)}
    state = abstract_state(m, lo, make_optimizer(t, 100))  # checks lora.targets / top_layers
    n_lora = lora_params(m, lo.rank, lo.targets, lo.top_layers or L)
    st_sh = state_shardings(state, amesh)
    adapter_dev = _sharded_bytes(state.adapter, st_sh.adapter)
    opt_dev = _sharded_bytes(state.opt_state, st_sh.opt_state)

    # -- sampling: the G -> V -> R tree ----------------------------------------------------
    Q = tr.questions_per_batch
    rows = Q * tr.n * tr.m * tr.l
    S = prompt_tokens + 3 * cfg.sampling.max_new_tokens + 2 * turn_tokens
    rows_dev = _split(rows, amesh)
    parent_dev = _split(Q * tr.n * tr.m, amesh)
    q_dev = _split(Q, amesh)
    kv_row = 2 * L * Kd * S * hd * b  # bytes of one row's cache on one device
    lin = 4 * D + 3 * Hd * hd + 3 * Kd * hd + 3 * Fd  # saved activation elements per token per layer
    c["adapters"] = 3 * adapter_dev
    c["kv_cache"] = rows_dev * kv_row
    c["kv_fork_parent"] = parent_dev * kv_row if tr.l > 1 else 0
    c["prefill"] = q_dev * prompt_tokens * (b * lin + Hd * S * (4 + b))
    # with fsdp a decoding step multiplies all rows by the head's local weight shard and
    # reduce-scatters the partial logits (sharding.gather_rows_for_head), so every device holds
    # the whole level's rows of float32 logits once
    c["decode_logits"] = (rows if sizes["fsdp"] > 1 else 0) * Vd * 4 + rows_dev * Vd * 4 * 2
    # compaction (sampling.compact_levels) decodes the live half of each device's rows in a copy
    # (then a quarter...); the last level's full cache is dropped once its half is gathered
    # (sampling.decode keep_cache=False), so at most 1/2 of the cache more is alive, and only
    # after the forked parent's cache has died: the peak is the cache + the larger of the two
    levels, half = 0, rows_dev // 2
    while levels < cfg.sampling.compact_levels and half >= MIN_COMPACT_ROWS:
        levels, half = levels + 1, half // 2
    c["kv_compacted"] = max(0, c["kv_cache"] // 2 - c["kv_fork_parent"]) if levels else 0

    # -- training: one microbatch ----------------------------------------------------------
    accum = max(int(t.grad_accum), 1)
    T = t.max_seq_len
    micro = max(t.batch_size // accum, 1)
    # DPO: one row per pair of up to 2T tokens (train.dpo_shared_prompt: the prompt once, both
    # completions scored, at most T positions each), or one row of T per completion
    shared = bool(t.dpo_shared_prompt)
    dpo_rows, T_dpo = (micro, 2 * T) if shared else (2 * micro, T)
    sft_dev, dpo_dev = _split(micro, amesh), _split(dpo_rows, amesh)
    L_bwd = lo.top_layers or L  # frozen lower layers (lora.top_layers) get no backward pass
    saved_layers = L_bwd + (1 if L_bwd < L else 0)  # + one transient frozen layer

    def layer_acts(Tr: int) -> int:  # one row's activations of one layer
        return Tr * (b * lin + Hd * Tr * (4 + b))

    # a rematerialised layer keeps only its input for the backward pass; the layer being
    # recomputed is alive alone, after the logits' backward has freed them, so the peak is
    # the larger of the two (checked against XLA's memory_analysis, tpu_configs/README.md)
    def per_row_layers(Tr: int) -> int:
        return saved_layers * Tr * D * b if m.remat else saved_layers * layer_acts(Tr)

    per_row_logits = T * Vd * 4 * 3
    c["adapter"] = adapter_dev
    c["gradients"] = adapter_dev * (2 if accum > 1 else 1)
    c["optimizer"] = opt_dev

    # SFT and DPO share component names; the DPO numbers go in *_dpo.
    def saved(rows_dev: int, Tr: int, logits_row: int) -> int:
        if not m.remat:
            return rows_dev * per_row_layers(Tr)
        return rows_dev * (per_row_layers(Tr) + max(0, layer_acts(Tr) - logits_row))

    dpo_logits_row = per_row_logits * (2 if shared else 1)
    c["activations"] = saved(sft_dev, T, per_row_logits)
    c["logits"] = sft_dev * per_row_logits
    c["activations_dpo"] = saved(dpo_dev, T_dpo, dpo_logits_row)
    c["logits_dpo"] = dpo_dev * dpo_logits_row
    layer_params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params["layers"]))
    head_params = V * D
    c["fsdp_gather"] = (
        (layer_params + head_params) * jnp.dtype(m.param_dtype).itemsize // max(tp, 1) if sizes["fsdp"] > 1 else 0
    )
    # decoding gathers one layer at a time, never the LM head (its rows are gathered instead)
    c["fsdp_gather_layer"] = layer_params * jnp.dtype(m.param_dtype).itemsize // max(tp, 1) if sizes["fsdp"] > 1 else 0
    # the prompt's prefill and a decoding step are not alive together: count the prefill's excess
    c["prefill"] = max(0, c["prefill"] - c["decode_logits"] - c["fsdp_gather_layer"])

    train_common = ("adapter", "gradients", "optimizer", "fsdp_gather")
    phases = {
        "sample": (
            "adapters",
            "kv_cache",
            "kv_fork_parent",
            "kv_compacted",
            "prefill",
            "decode_logits",
            "fsdp_gather_layer",
        ),
        "sft": train_common + ("activations", "logits"),
        "dpo": train_common + ("activations_dpo", "logits_dpo"),
    }

    # -- RL (malt-jax rl): the rollout and the policy-gradient update ------------------------
    rl_details: dict[str, Any] = {}
    if cfg.rl.iterations > 0:
        per_token = b * lin  # one layer's saved elements per token, and the attention's bytes per score
        rl_details = _rl_components(
            cfg, c, phases, amesh, adapter_dev, opt_dev, saved, (per_token, Hd * (4 + b)), prompt_tokens, turn_tokens
        )

    # -- FLOPs -----------------------------------------------------------------------------
    flops = {}
    for kind, r in (("sft", t.batch_size), ("dpo", 2 * t.batch_size)):
        flops[kind] = analytic_step_flops(cfg, r)
        flops[f"{kind}_tokens"] = float(r * T)
        flops[f"{kind}_per_device"] = flops[kind] / n_dev
    if cfg.rl.iterations > 0:
        for k, v in rl_iteration_flops(cfg, prompt_tokens, turn_tokens).items():
            flops[f"rl_{k}"] = v
        for k in ("rollout", "update", "iteration"):
            flops[f"rl_{k}_per_device"] = flops[f"rl_{k}"] / n_dev

    details = {
        "param_dtype": m.param_dtype,
        "dtype": m.dtype,
        "param_bytes_total": _tree_bytes(params),
        "sample_rows": rows,
        "questions": Q,
        "tree": f"{tr.n}x{tr.m}x{tr.l}",
        "cache_len": S,
        "prompt_tokens": prompt_tokens,
        "turn_tokens": turn_tokens,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "sample_rows_per_device": rows_dev,
        "sft_rows": micro,
        "dpo_rows": dpo_rows,
        "seq_len": T,
        "dpo_seq_len": T_dpo,
        "sft_rows_per_device": sft_dev,
        "dpo_rows_per_device": dpo_dev,
        "activation_factor": (b * lin + Hd * T * (4 + b)) / (D * b),
    }
    details.update(rl_details)
    notes = _notes(cfg, rows, micro, batch_shards(amesh), S)
    if rl_details and batch_shards(amesh) > 1 and cfg.rl.micro_batch % batch_shards(amesh):
        notes.append(
            f"rl.micro_batch ({cfg.rl.micro_batch}) not divisible by data*fsdp = {batch_shards(amesh)}: the RL "
            "update's rows are replicated, not split"
        )

    plan = Plan(
        name=cfg.name,
        mesh=sizes,
        devices=n_dev,
        device=device,
        device_memory=mem,
        usable=usable,
        n_params=m.n_params,
        n_lora=n_lora,
        components=c,
        phases=phases,
        details=details,
        flops=flops,
        notes=notes,
    )
    if compile:
        plan.compiled = one_layer_check(cfg, sizes, n_dev)
    return plan
