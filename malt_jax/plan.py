"""Per-device memory and FLOP plan of a run on a mesh, without the hardware (``malt-jax plan``).

Everything is computed from *abstract* shapes: ``jax.eval_shape`` of the base parameters, the
LoRA adapter and the optimizer state, and the sharding rules of ``sharding.py`` applied to an
``AbstractMesh`` of the requested size (so a 64-chip plan runs on a laptop and nothing is
allocated). Components, per device (bytes):

Always resident
  ``parameters``     frozen base weights, exact shard sizes (``param_shardings``).

Sampling (trajectory expansion ``G -> V -> R``, the biggest inference batch)
  ``adapters``       the three role adapters (float32, LoRA shardings).
  ``kv_cache``       refiner level: ``rows = questions_per_batch * n*m*l``, length
                     ``S = prompt_tokens + 3 * max_new_tokens + 2 * turn_tokens``;
                     ``2 (k, v) * L * rows * K * S * hd * bytes(dtype)``, rows split over
                     ``data x fsdp`` and KV heads over ``tensor`` (``KV_CACHE_AXES``).
  ``kv_fork_parent`` the verifier-level cache (``rows / l``) alive while it is forked.
  ``prefill``        one layer's activations while the questions are prefilled
                     (``Q * prompt * (bytes * (4D + 3Hhd + 3Khd + 3F) + H * S * (4 + bytes))``),
                     less the decoding transients below (never alive at the same time).
  ``decode_logits``  ``rows/device * vocab * 4 B * 2`` (float32 logits, log-softmax), plus with
                     fsdp the partial logits of all ``rows`` (the LM head is not gathered in
                     decoding: the rows are, ``sharding.gather_rows_for_head``).
  ``kv_compacted``   the copies compaction decodes the live rows in (``sampling.compact_levels``:
                     half of each device's cache, then a quarter...).
  ``fsdp_gather_layer`` with ``fsdp > 1``: one layer's weights gathered while it runs.

SFT / DPO train step (one microbatch of ``batch_size / grad_accum`` examples; DPO has 2 rows
per pair)
  ``adapter``, ``gradients`` (x2 with ``grad_accum > 1``: accumulator), ``optimizer`` (Adam
  ``mu``, ``nu``: exact from ``eval_shape(make_optimizer(...).init)``, same shardings as the
  adapter).
  ``activations``    saved for the backward pass. Without ``model.remat``:
                     ``rows * T * L * [bytes * (4D + 3*H*hd + 3*K*hd + 3*F) + H * T * (4 + bytes)]``
                     -- the residual stream, both norms' outputs, q/k/v before and after RoPE,
                     attention output, gate/up/act of the MLP, plus the float32 attention scores
                     and their probabilities (no flash attention: the ``T^2`` term). Head / FFN
                     terms are divided by ``tensor`` when it splits them. In units of
                     ``D * bytes`` this is the "activation factor" printed with the plan
                     (Llama-3.1-8B, bfloat16: ``18.25 + 3 * 32 * T / 4096``, i.e. 42 at T = 1024).
                     With ``model.remat`` each layer keeps only its input (``rows * T * L * D *
                     bytes``) and one layer is recomputed at a time, after the logits' backward
                     has freed them: ``+ max(0, one layer's activations - logits)``.
                     Checked against XLA's ``memory_analysis`` (``compile_step``): see
                     tpu_configs/README.md.
  ``logits``         ``rows * T * vocab * 4 B * 3`` (float32 logits, log-softmax, their gradient).
  ``fsdp_gather``    with ``fsdp > 1``: one layer plus the LM head gathered in full (transient).

A phase fits if ``parameters + its components <= usable * device_memory`` (``usable`` 0.9 by
default: XLA/runtime reservations and fragmentation). Otherwise the plan is REFUSED, naming the
overflowing component -- ``parameters`` if the weights alone do not fit, else the phase's
largest component -- and what to change.

FLOPs of one train step are analytic (global, then / devices for an ideal split)::

    4 * N_mm * tokens + 6 * N_lora * tokens + 12 * L * H * hd * T * tokens

(forward ``2 N`` plus the backward input-gradient ``2 N`` through the frozen weights, LoRA
forward + both backward products, full ``T x T`` attention forward ``4 L H hd T`` and backward
twice that; ``N_mm`` = layer matrices + LM head). With ``lora.top_layers = k`` only the top
``k`` layers (and the LM head) get a backward pass and keep activations. XLA's ``cost_analysis`` counts a ``scan``
body once, so the full model cannot be measured by compiling it; with ``compile=True`` the plan
AOT-compiles (``jax.jit(...).lower(ShapeDtypeStruct with shardings).compile()``, no arrays
allocated) a **1-layer** version of the sharded SFT step on the local (fake CPU) devices and
reports its ``cost_analysis`` FLOPs and ``memory_analysis`` next to the analytic 1-layer
number as a cross-check (XLA:CPU upcasts bfloat16 matmuls, so its memory numbers are an upper
bound for TPU/GPU). This takes ~5-10 s for the 8B shapes; the full 32-layer step is not compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from malt_jax.config import RunConfig, to_dict

__all__ = ["DEVICE_HBM", "PlanError", "Plan", "make_plan", "parse_bytes", "parse_mesh", "fmt_bytes",
           "overlay_overrides", "load_overlay", "compile_step", "compile_expansion", "compiled_bytes"]

GiB = 1024 ** 3

# Nominal HBM per JAX device (a TPU chip -- v4/v5p chips are one megacore device -- or a GPU).
DEVICE_HBM: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "a100": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
}
DEFAULT_DEVICE = "v5e"
USABLE_FRACTION = 0.9

PHASES = ("sample", "sft", "dpo")

_ADVICE = {
    "parameters": "shard the frozen weights over more devices: raise mesh fsdp (and/or tensor), "
                  "e.g. --mesh data=1,fsdp={fsdp_hint},tensor=1 (needs that many devices)",
    "adapters": "lower lora.rank or use fewer lora.targets, or raise mesh fsdp",
    "adapter": "lower lora.rank or use fewer lora.targets, or raise mesh fsdp",
    "gradients": "lower lora.rank or use fewer lora.targets, or raise mesh fsdp",
    "optimizer": "lower lora.rank or use fewer lora.targets, or raise mesh fsdp",
    "kv_cache": "lower tree.questions_per_batch (rows = questions x n*m*l) or sampling.max_new_tokens, "
                "spread the rows over more data/fsdp devices, or raise tensor (splits the KV heads)",
    "kv_fork_parent": "lower tree.questions_per_batch or sampling.max_new_tokens, or add data/fsdp devices",
    "prefill": "lower tree.questions_per_batch or the prompt length, or add data/fsdp devices",
    "decode_logits": "lower tree.questions_per_batch, add data/fsdp devices or raise tensor (splits the vocab)",
    "activations": "lower train.batch_size or raise train.grad_accum (a microbatch is batch_size/grad_accum "
                   "examples), shorten train.max_seq_len, or add data/fsdp devices",
    "logits": "lower train.batch_size or raise train.grad_accum, shorten train.max_seq_len, add data/fsdp "
              "devices or raise tensor (splits the vocab)",
    "fsdp_gather": "raise mesh tensor (splits each gathered layer)",
    "fsdp_gather_layer": "raise mesh tensor (splits each gathered layer)",
    "kv_compacted": "set sampling.compact_levels lower (0: no compaction copies), or see kv_cache",
}
_ADVICE["activations_dpo"] = _ADVICE["activations"] + " (a DPO microbatch holds 2 rows per pair)"
_ADVICE["logits_dpo"] = _ADVICE["logits"] + " (a DPO microbatch holds 2 rows per pair)"


class PlanError(ValueError):
    """The configuration does not fit the device memory budget (the message says why)."""


# ----------------------------------------------------------------------------------------------
# small parsers


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": GiB, "tib": 1024 ** 4}


def parse_bytes(text: str | int | float) -> int:
    """``"16GiB"``, ``"80GB"``, ``"1.5TiB"``, ``"95G"`` (decimal), or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a memory size from {text!r} (use e.g. 16GiB, 80GB, 95G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_mesh(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=1,fsdp=8,tensor=1"`` (or a mapping) -> ``{"data": 1, "fsdp": 8, "tensor": 1}``."""
    from malt_jax.sharding import MESH_AXES

    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = dict(text)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            if "=" not in part:
                raise ValueError(f"--mesh: {part!r} is not axis=size (e.g. data=1,fsdp=8,tensor=1)")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
    out = {}
    for k, v in items.items():
        if k not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {k!r}; axes are {MESH_AXES}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"mesh: size of {k!r} must be an integer, got {v!r}") from None
    return out


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_flops(x: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} FLOP"


# ----------------------------------------------------------------------------------------------
# hardware overlays (tpu_configs/*.yaml)


def load_overlay(path: str | Path) -> dict:
    """A ``tpu_configs`` YAML: RunConfig keys plus an optional ``plan:`` section (device, devices)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def overlay_overrides(path: str | Path) -> list[str]:
    """Flattens an overlay YAML into ``key=value`` overrides for ``malt-jax run CONFIG ...``.

    Sections (``train``, ``tree``, ...) become dotted keys; ``mesh`` and other mappings whose
    keys are data (``task.options``) stay one compact JSON/YAML value so they replace the
    experiment's whole mapping. The ``plan:`` section is not a RunConfig key and is dropped.
    """
    data = {k: v for k, v in load_overlay(path).items() if k != "plan"}
    out: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        atomic = prefix in ("mesh", "task.options", "model.rope_scaling")
        if isinstance(node, dict) and not atomic:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append(f"{prefix}={json.dumps(node, separators=(',', ':'))}")

    walk("", data)
    return out


# ----------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Plan:
    """Per-device memory (bytes) and FLOPs of a run on a mesh; see the module docstring."""

    name: str
    mesh: dict[str, int]
    devices: int
    device: str
    device_memory: int
    usable: float
    n_params: int
    n_lora: int  # one role's adapter
    components: dict[str, int]
    phases: dict[str, tuple[str, ...]]
    details: dict[str, Any]
    flops: dict[str, float]
    compiled: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def budget(self) -> int:
        return int(self.device_memory * self.usable)

    def phase_total(self, phase: str) -> int:
        return self.components["parameters"] + sum(self.components[c] for c in self.phases[phase])

    @property
    def peak(self) -> int:
        return max(self.phase_total(p) for p in self.phases)

    def overflows(self) -> list[tuple[str, str]]:
        """``[(phase, component)]`` for every phase over budget."""
        out = []
        for phase, comps in self.phases.items():
            if self.phase_total(phase) > self.budget:
                if self.components["parameters"] > self.budget or not comps:
                    out.append((phase, "parameters"))
                else:
                    out.append((phase, max(comps, key=lambda c: self.components[c])))
        return out

    @property
    def fits(self) -> bool:
        return not self.overflows()

    def refusal(self) -> str:
        """The refusal message ('' if the plan fits)."""
        over = self.overflows()
        if not over:
            return ""
        budget = (f"{fmt_bytes(self.budget)} usable per device ({self.usable:.0%} of {fmt_bytes(self.device_memory)}"
                  f" on {self.device})")
        lines = [f"plan refused: {self.name} does not fit on mesh {_mesh_str(self.mesh)} ({self.devices} devices), "
                 f"{budget}."]
        hint = {"fsdp_hint": self._fsdp_hint()}
        seen = set()
        for phase, comp in over:
            lines.append(f"  {phase}: needs {fmt_bytes(self.phase_total(phase))} per device; overflowing component: "
                         f"{comp} ({fmt_bytes(self.components[comp])})")
            if comp not in seen:
                seen.add(comp)
                lines.append(f"    fix: {_ADVICE[comp].format(**hint)}")
        return "\n".join(lines)

    def _fsdp_hint(self) -> int:
        shardable = self.details["param_bytes_total"]
        k = 1
        while k < 4096 and shardable / k > 0.5 * self.budget:
            k *= 2
        return max(k, 2)

    def check(self) -> "Plan":
        """Raises :class:`PlanError` (with :meth:`refusal`) if the plan does not fit."""
        if not self.fits:
            raise PlanError(self.refusal())
        return self

    def table(self) -> str:
        c, d = self.components, self.details
        lines = [
            f"plan: {self.name} | mesh {_mesh_str(self.mesh)} = {self.devices} devices | {self.device}: "
            f"{fmt_bytes(self.device_memory)} per device, budget {fmt_bytes(self.budget)} ({self.usable:.0%})",
            f"model: {self.n_params / 1e9:.3f} B params ({d['param_dtype']}), LoRA {self.n_lora / 1e6:.2f} M "
            f"params per role (float32); compute dtype {d['dtype']}",
            f"sampling: rows {d['sample_rows']} (= {d['questions']} questions x {d['tree']}), KV cache length "
            f"{d['cache_len']} (= prompt {d['prompt_tokens']} + 3 x {d['max_new_tokens']} new + 2 x {d['turn_tokens']} "
            f"turn tokens), rows per device {d['sample_rows_per_device']}",
            f"training: microbatch {d['sft_rows']} rows (SFT) / {d['dpo_rows']} rows (DPO) x {d['seq_len']} tokens, "
            f"rows per device {d['sft_rows_per_device']} / {d['dpo_rows_per_device']}, activation factor "
            f"{d['activation_factor']:.1f} x D x bytes per token per layer",
            "",
            f"{'per device':<16}" + "".join(f"{p:>13}" for p in self.phases),
        ]
        order = ["parameters"] + [k for k in c if k != "parameters"]
        for comp in order:
            cells = []
            for p, comps in self.phases.items():
                cells.append(fmt_bytes(c[comp]) if comp == "parameters" or comp in comps else "-")
            lines.append(f"{comp:<16}" + "".join(f"{x:>13}" for x in cells))
        lines.append(f"{'total':<16}" + "".join(f"{fmt_bytes(self.phase_total(p)):>13}" for p in self.phases))
        lines.append(f"{'fits':<16}" + "".join(f"{('yes' if self.phase_total(p) <= self.budget else 'NO'):>13}"
                                                for p in self.phases))
        f = self.flops
        lines += [
            "",
            f"FLOPs per train step (analytic; 4*N*tok + 6*N_lora*tok + 12*L*H*hd*T*tok with all layers adapted): "
            f"SFT {_fmt_flops(f['sft'])}, "
            f"DPO {_fmt_flops(f['dpo'])}; per device SFT {_fmt_flops(f['sft_per_device'])}, "
            f"DPO {_fmt_flops(f['dpo_per_device'])} ({f['sft_tokens']:.0f} / {f['dpo_tokens']:.0f} tokens per step)",
        ]
        if self.compiled:
            k = self.compiled
            if "error" in k:
                lines.append(f"AOT check skipped: {k['error']}")
            else:
                lines.append(
                    f"AOT check (1-layer SFT microbatch, compiled on {k['devices']} local {k['platform']} devices in "
                    f"{k['compile_s']:.1f} s): XLA cost_analysis {_fmt_flops(k['flops'])} per device vs analytic "
                    f"{_fmt_flops(k['analytic_flops'])} (ratio {k['flops'] / max(k['analytic_flops'], 1):.2f}); "
                    f"XLA:{k['platform'].upper()} memory_analysis args {fmt_bytes(k['argument_bytes'])}, temp "
                    f"{fmt_bytes(k['temp_bytes'])} (a 1-layer program; XLA:CPU upcasts bfloat16 and reuses buffers "
                    "less than TPU/GPU, so read its temp as an upper bound)")
        for n in self.notes:
            lines.append(f"note: {n}")
        lines.append("verdict: " + ("fits" if self.fits else "REFUSED (see below)"))
        return "\n".join(lines)


def _mesh_str(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def _abstract_mesh(shape: Mapping[str, int]) -> Any:
    from jax.sharding import AbstractMesh

    from malt_jax.sharding import MESH_AXES

    return AbstractMesh(tuple(int(shape[a]) for a in MESH_AXES), MESH_AXES)


def _sharded_bytes(tree: Any, shardings: Any) -> int:
    import jax

    return int(sum(int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def _tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _split(n_rows: int, mesh: Any) -> int:
    """Rows per device of a batch-sharded array (replicated when not divisible, as in spec_for)."""
    from malt_jax.sharding import spec_for

    spec = spec_for(("batch",), (n_rows,), mesh)
    if spec[0] is None:
        return n_rows
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return n_rows // int(np.prod([mesh.shape[a] for a in axes]))


def _div(n: int, tp: int) -> int:
    """Per-device share of a dimension split over ``tensor`` (replicated when not divisible)."""
    return n // tp if tp > 1 and n % tp == 0 else n


def make_plan(cfg: RunConfig, mesh: Mapping[str, int] | str | None = None, devices: int | None = None,
              device: str | None = None, device_memory: int | str | None = None, usable: float = USABLE_FRACTION,
              prompt_tokens: int = 256, turn_tokens: int = 32, compile: bool = False) -> Plan:
    """Builds the per-device plan of ``cfg`` on ``mesh`` (default: ``cfg.mesh``, else all
    ``devices`` on ``data``). ``device`` picks the HBM size from :data:`DEVICE_HBM` unless
    ``device_memory`` is given. Nothing is allocated; see the module docstring for the model."""
    import jax
    import jax.numpy as jnp

    from malt_jax.model.llama import init_params
    from malt_jax.model.lora import adapter_shapes
    from malt_jax.sharding import MESH_AXES, param_shardings
    from malt_jax.train import TrainState, make_optimizer, state_shardings

    # -- mesh ------------------------------------------------------------------------------
    shape = parse_mesh(mesh) if mesh is not None else dict(cfg.mesh)
    if not shape:
        shape = {"data": int(devices or 1)}
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    if -1 in sizes.values():
        if devices is None:
            raise ValueError("mesh: an axis of -1 needs --devices")
        rest = int(np.prod([s for s in sizes.values() if s != -1]))
        sizes = {a: (devices // rest if s == -1 else s) for a, s in sizes.items()}
    n_dev = int(np.prod(list(sizes.values())))
    if devices is not None and n_dev != devices:
        raise ValueError(f"mesh {_mesh_str(sizes)} has {n_dev} devices but --devices is {devices}")
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"mesh {_mesh_str(sizes)}: sizes must be >= 1")
    amesh = _abstract_mesh(sizes)

    if device_memory is None:
        device = device or DEFAULT_DEVICE
        if device not in DEVICE_HBM:
            raise ValueError(f"--device: unknown device {device!r}; choose from {sorted(DEVICE_HBM)} "
                             "or give --device-memory")
        mem = DEVICE_HBM[device]
    else:
        mem = parse_bytes(device_memory)
        device = device or "custom"
    if not 0 < usable <= 1:
        raise ValueError(f"usable fraction must be in (0, 1], got {usable}")

    m, t, tr, lo = cfg.model, cfg.train, cfg.tree, cfg.lora
    L, D, H, K, hd, F, V = m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.hidden_dim, m.vocab_size
    b = jnp.dtype(m.dtype).itemsize
    tp = sizes["tensor"]
    Hd, Kd, Fd, Vd = _div(H, tp), _div(K, tp), _div(F, tp), _div(V, tp)

    # -- abstract state: params, adapter, optimizer ----------------------------------------
    params = jax.eval_shape(lambda: init_params(m, jax.random.key(0)))
    p_sh = param_shardings(params, amesh)
    c: dict[str, int] = {"parameters": _sharded_bytes(params, p_sh)}
    n_params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    ad = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), adapter_shapes(m, lo),
                      is_leaf=lambda x: isinstance(x, tuple))
    n_lora = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ad)))
    opt = make_optimizer(t, 100)
    state = jax.eval_shape(lambda a: TrainState.create(a, opt), ad)
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
    # compaction (sampling.compact_levels) decodes the live half of each device's rows in a copy,
    # then a quarter...: 1/2 + 1/4 + ... of the cache more
    levels, half = 0, rows_dev // 2
    while levels < cfg.sampling.compact_levels and half >= 4:  # sampling._MIN_COMPACT_ROWS
        levels, half = levels + 1, half // 2
    c["kv_compacted"] = int(c["kv_cache"] * (1 - 0.5 ** levels))

    # -- training: one microbatch ----------------------------------------------------------
    accum = max(int(t.grad_accum), 1)
    T = t.max_seq_len
    micro = max(t.batch_size // accum, 1)
    sft_dev, dpo_dev = _split(micro, amesh), _split(2 * micro, amesh)
    L_bwd = lo.top_layers or L  # frozen lower layers (lora.top_layers) get no backward pass
    saved_layers = L_bwd + (1 if L_bwd < L else 0)  # + one transient frozen layer
    layer_acts = T * (b * lin + Hd * T * (4 + b))  # one row's activations of one layer
    if m.remat:
        # a rematerialised layer keeps only its input for the backward pass; the layer being
        # recomputed is alive alone, after the logits' backward has freed them, so the peak is
        # the larger of the two (checked against XLA's memory_analysis, tpu_configs/README.md)
        per_row_layers = saved_layers * T * D * b
    else:
        per_row_layers = saved_layers * layer_acts
    per_row_logits = T * Vd * 4 * 3
    c["adapter"] = adapter_dev
    c["gradients"] = adapter_dev * (2 if accum > 1 else 1)
    c["optimizer"] = opt_dev
    # SFT and DPO share component names; the DPO numbers (2 rows per pair) go in *_dpo.
    def saved(rows_dev: int) -> int:
        if not m.remat:
            return rows_dev * per_row_layers
        return rows_dev * (per_row_layers + max(0, layer_acts - per_row_logits))

    c["activations"] = saved(sft_dev)
    c["logits"] = sft_dev * per_row_logits
    c["activations_dpo"] = saved(dpo_dev)
    c["logits_dpo"] = dpo_dev * per_row_logits
    layer_params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params["layers"]))
    head_params = V * D
    c["fsdp_gather"] = ((layer_params + head_params) * jnp.dtype(m.param_dtype).itemsize // max(tp, 1)
                        if sizes["fsdp"] > 1 else 0)
    # decoding gathers one layer at a time, never the LM head (its rows are gathered instead)
    c["fsdp_gather_layer"] = (layer_params * jnp.dtype(m.param_dtype).itemsize // max(tp, 1)
                              if sizes["fsdp"] > 1 else 0)
    # the prompt's prefill and a decoding step are not alive together: count the prefill's excess
    c["prefill"] = max(0, c["prefill"] - c["decode_logits"] - c["fsdp_gather_layer"])

    train_common = ("adapter", "gradients", "optimizer", "fsdp_gather")
    phases = {
        "sample": ("adapters", "kv_cache", "kv_fork_parent", "kv_compacted", "prefill", "decode_logits",
                   "fsdp_gather_layer"),
        "sft": train_common + ("activations", "logits"),
        "dpo": train_common + ("activations_dpo", "logits_dpo"),
    }

    # -- FLOPs -----------------------------------------------------------------------------
    flops = {}
    for kind, r in (("sft", t.batch_size), ("dpo", 2 * t.batch_size)):
        flops[kind] = analytic_step_flops(cfg, r)
        flops[f"{kind}_tokens"] = float(r * T)
        flops[f"{kind}_per_device"] = flops[kind] / n_dev

    details = {
        "param_dtype": m.param_dtype, "dtype": m.dtype, "param_bytes_total": _tree_bytes(params),
        "sample_rows": rows, "questions": Q, "tree": f"{tr.n}x{tr.m}x{tr.l}", "cache_len": S,
        "prompt_tokens": prompt_tokens, "turn_tokens": turn_tokens, "max_new_tokens": cfg.sampling.max_new_tokens,
        "sample_rows_per_device": rows_dev, "sft_rows": micro, "dpo_rows": 2 * micro, "seq_len": T,
        "sft_rows_per_device": sft_dev, "dpo_rows_per_device": dpo_dev,
        "activation_factor": (b * lin + Hd * T * (4 + b)) / (D * b),
    }
    notes = []
    if S > T:
        notes.append(f"KV cache length {S} > train.max_seq_len {T}: refiner SFT/DPO examples (prompt + G + V + R) "
                     "will be truncated; raise train.max_seq_len")
    for name, r in (("sampling rows", rows), ("SFT microbatch", micro), ("DPO microbatch rows", 2 * micro)):
        shards = sizes["data"] * sizes["fsdp"]
        if shards > 1 and r % shards:
            notes.append(f"{name} ({r}) not divisible by data*fsdp = {shards}: that batch is replicated, not split")
    if t.batch_size % accum:
        notes.append(f"train.batch_size {t.batch_size} is not a multiple of train.grad_accum {accum} (the trainer "
                     "will refuse it)")

    plan = Plan(name=cfg.name, mesh=sizes, devices=n_dev, device=device, device_memory=mem, usable=usable,
                n_params=n_params, n_lora=n_lora, components=c, phases=phases, details=details, flops=flops,
                notes=notes)
    if compile:
        plan.compiled = _aot_check(cfg, sizes, n_dev)
    return plan


def layer_params_mm(m: Any) -> int:
    """Matrix parameters of one decoder layer (norm vectors excluded)."""
    return m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.dim * m.hidden_dim


def analytic_step_flops(cfg: RunConfig, rows: int) -> float:
    """Analytic FLOPs of one train step on ``rows`` x ``train.max_seq_len`` tokens.

    Forward ``2 * N_mm`` per token through every layer and the LM head; backward input
    gradients ``2 * N_mm`` through the LM head and the adapted layers only (``lora.top_layers``:
    frozen lower layers get no backward pass); LoRA ``6 * N_lora`` (forward, input and weight
    gradients); attention over the full ``T x T`` (masked, not skipped) ``4 * H * hd * T`` per
    token and layer forward, twice that backward."""
    m, lo = cfg.model, cfg.lora
    T = cfg.train.max_seq_len
    tokens = float(rows * T)
    L = m.n_layers
    L_bwd = lo.top_layers or L
    per_layer, head = layer_params_mm(m), m.vocab_size * m.dim
    r, k = lo.rank, L_bwd
    shapes = {"wq": (m.dim, m.n_heads * m.head_dim), "wk": (m.dim, m.n_kv_heads * m.head_dim),
              "wv": (m.dim, m.n_kv_heads * m.head_dim), "wo": (m.n_heads * m.head_dim, m.dim),
              "w_gate": (m.dim, m.hidden_dim), "w_up": (m.dim, m.hidden_dim), "w_down": (m.hidden_dim, m.dim)}
    n_lora = k * sum(r * (shapes[n][0] + shapes[n][1]) for n in lo.targets)
    attn = 4 * m.n_heads * m.head_dim * T
    fwd = 2 * (L * per_layer + head) + attn * L
    bwd = 2 * (L_bwd * per_layer + head) + 2 * attn * L_bwd
    return tokens * (fwd + bwd + 6 * n_lora)


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(cfg: RunConfig, kind: str, mesh: Any) -> Any:
    """AOT-compiles the sharded SFT or DPO step of one microbatch (``batch_size / grad_accum``
    examples; DPO: pairs) of ``cfg`` on ``mesh`` from abstract shapes (nothing is allocated):
    the executable ``Stepper`` runs, for ``memory_analysis()`` / ``cost_analysis()``."""
    import jax
    import jax.numpy as jnp

    from malt_jax.model.llama import init_params
    from malt_jax.model.lora import adapter_shapes
    from malt_jax.sharding import param_shardings
    from malt_jax.train import ROW_KEYS, Stepper, TrainState, make_optimizer, state_shardings

    t = cfg.train
    micro = max(t.batch_size // max(t.grad_accum, 1), 1)
    t = dataclasses.replace(t, grad_accum=1, batch_size=micro)
    opt = make_optimizer(t, 100)
    params = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    ad = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), adapter_shapes(cfg.model, cfg.lora),
                      is_leaf=lambda x: isinstance(x, tuple))
    state = jax.eval_shape(lambda a: TrainState.create(a, opt), ad)
    rows, T = micro * (2 if kind == "dpo" else 1), t.max_seq_len
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "comp_index": jnp.int32,
              "comp_valid": jnp.bool_}
    batch = {k: jax.ShapeDtypeStruct((rows, T), dtypes[k]) for k in ROW_KEYS if k in dtypes}
    batch["weights"] = jax.ShapeDtypeStruct((micro,), jnp.float32)
    stepper = Stepper(kind, cfg.model, cfg.lora, t, opt, mesh=mesh)
    ref = jax.ShapeDtypeStruct((rows,), jnp.float32) if kind == "dpo" else None
    lowered = stepper.lower(_abstract(params, param_shardings(params, mesh)),
                            _abstract(state, state_shardings(state, mesh)), batch, ref)
    return lowered.compile()


def compile_expansion(cfg: RunConfig, mesh: Any, prompt_tokens: int = 256, turn_tokens: int = 32) -> Any:
    """AOT-compiles the trajectory expansion the plan's ``sample`` phase describes: one batch of
    ``tree.questions_per_batch`` questions of ``prompt_tokens``, expanded ``n x m x l`` in the
    chat framing (one growing cache, forked per level) with ``turn_tokens`` per role turn and
    ``sampling.max_new_tokens`` per role, sharded on ``mesh``; abstract shapes only."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from malt_jax.expansion import ExpansionSpec, expand
    from malt_jax.model.llama import init_params
    from malt_jax.sharding import batch_sharding, mesh_context, param_shardings

    params = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    Q, tr, mx = cfg.tree.questions_per_batch, cfg.tree, cfg.sampling.max_new_tokens
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), Q))
    rep = NamedSharding(mesh, P())
    spec = ExpansionSpec(n=tr.n, m=tr.m, l=tr.l, max_new=(mx, mx, mx), sampling=cfg.sampling, mode="extend")
    with mesh_context(mesh):
        lowered = expand.lower(
            _abstract(params, param_shardings(params, mesh)), (None, None, None),
            jax.ShapeDtypeStruct((Q, prompt_tokens), jnp.int32, sharding=batch_sharding(mesh, 2, (Q, prompt_tokens))),
            jax.ShapeDtypeStruct((Q,), jnp.int32, sharding=batch_sharding(mesh, 1, (Q,))),
            tuple(jax.ShapeDtypeStruct((turn_tokens,), jnp.int32, sharding=rep) for _ in range(2)),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=batch_sharding(mesh, 1, (Q,))),
            cfg=cfg.model, spec=spec)
    return lowered.compile()


def compiled_bytes(compiled: Any) -> int:
    """Per-device peak of an executable by XLA's ``memory_analysis``: arguments + outputs +
    temporaries - what outputs alias from arguments."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _aot_check(cfg: RunConfig, sizes: dict[str, int], n_dev: int) -> dict[str, Any]:
    """AOT-compiles a 1-layer version of the sharded SFT step (one microbatch) from abstract
    shapes on the first ``n_dev`` local devices; returns cost/memory analysis."""
    import time

    import jax

    from malt_jax.sharding import make_mesh

    have = jax.device_count()
    if have < n_dev:
        return {"error": f"the mesh needs {n_dev} devices but only {have} are visible (run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} JAX_PLATFORMS=cpu)"}
    t = cfg.train
    micro = max(t.batch_size // max(t.grad_accum, 1), 1)
    one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=1),
                              lora=dataclasses.replace(cfg.lora, top_layers=0),
                              train=dataclasses.replace(t, grad_accum=1, batch_size=micro))
    t0 = time.perf_counter()
    compiled = compile_step(one, "sft", make_mesh(sizes, jax.devices()[:n_dev]))
    dt = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {
        "devices": n_dev, "platform": jax.devices()[0].platform, "compile_s": dt,
        "flops": float((cost or {}).get("flops", 0.0)),
        "analytic_flops": analytic_step_flops(one, micro) / n_dev,
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0) or 0),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0) or 0),
    }


def plan_dict(plan: Plan) -> dict:
    """JSON-friendly view (for ``malt-jax plan --json``)."""
    return {"name": plan.name, "mesh": plan.mesh, "devices": plan.devices, "device": plan.device,
            "device_memory": plan.device_memory, "budget": plan.budget, "fits": plan.fits,
            "components": plan.components, "phases": {p: plan.phase_total(p) for p in plan.phases},
            "flops": plan.flops, "details": to_dict(plan.details), "compiled": plan.compiled,
            "notes": plan.notes, "refusal": plan.refusal()}

