"""The planner's text: parsing what ``malt-jax plan`` is given (memory sizes, ``--mesh``, the
``tpu_configs`` overlays) and writing what it prints (the table, the refusal, the JSON view).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malt_jax.config import to_dict

if TYPE_CHECKING:
    from malt_jax.plan import Plan

__all__ = [
    "GiB",
    "parse_bytes",
    "parse_mesh",
    "fmt_bytes",
    "fmt_flops",
    "mesh_str",
    "load_overlay",
    "overlay_overrides",
    "ADVICE",
    "refusal",
    "table",
    "plan_dict",
]

GiB = 1024**3


# ----------------------------------------------------------------------------------------------
# inputs


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": GiB,
    "tib": 1024**4,
}


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
    items: dict[str, Any]
    if isinstance(text, Mapping):
        items = dict(text)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            if "=" not in part:
                raise ValueError(f"--mesh: {part!r} is not axis=size (e.g. data=1,fsdp=8,tensor=1)")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
    out: dict[str, int] = {}
    for k, v in items.items():
        if k not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {k!r}; axes are {MESH_AXES}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"mesh: size of {k!r} must be an integer, got {v!r}") from None
    return out


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_flops(x: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} FLOP"


def mesh_str(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


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
# outputs

# what to change when a component overflows (every component of a plan has an entry)
ADVICE = {
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
ADVICE["activations_dpo"] = ADVICE["activations"] + (
    " (a DPO pair is one row of prompt + both completions; without model.remat, "
    "train.dpo_shared_prompt=false (a row per completion) halves the attention's share)"
)
ADVICE["logits_dpo"] = ADVICE["logits"] + " (a DPO pair scores both completions)"


def refusal(plan: Plan) -> str:
    """The refusal message of a plan ('' if it fits): each overflowing phase, its largest component
    and what to change."""
    over = plan.overflows()
    if not over:
        return ""
    budget = (
        f"{fmt_bytes(plan.budget)} usable per device ({plan.usable:.0%} of {fmt_bytes(plan.device_memory)}"
        f" on {plan.device})"
    )
    lines = [
        f"plan refused: {plan.name} does not fit on mesh {mesh_str(plan.mesh)} ({plan.devices} devices), {budget}."
    ]
    hint = {"fsdp_hint": _fsdp_hint(plan)}
    seen = set()
    for phase, comp in over:
        lines.append(
            f"  {phase}: needs {fmt_bytes(plan.phase_total(phase))} per device; overflowing component: "
            f"{comp} ({fmt_bytes(plan.components[comp])})"
        )
        if comp not in seen:
            seen.add(comp)
            lines.append(f"    fix: {ADVICE[comp].format(**hint)}")
    return "\n".join(lines)


def _fsdp_hint(plan: Plan) -> int:
    """A power-of-two fsdp size that would bring the weights under half the budget."""
    shardable = plan.details["param_bytes_total"]
    k = 1
    while k < 4096 and shardable / k > 0.5 * plan.budget:
        k *= 2
    return max(k, 2)


def table(plan: Plan) -> str:
    """The plan as the text table ``malt-jax plan`` prints."""
    c, d = plan.components, plan.details
    lines = [
        f"plan: {plan.name} | mesh {mesh_str(plan.mesh)} = {plan.devices} devices | {plan.device}: "
        f"{fmt_bytes(plan.device_memory)} per device, budget {fmt_bytes(plan.budget)} ({plan.usable:.0%})",
        f"model: {plan.n_params / 1e9:.3f} B params ({d['param_dtype']}), LoRA {plan.n_lora / 1e6:.2f} M "
        f"params per role (float32); compute dtype {d['dtype']}",
        f"sampling: rows {d['sample_rows']} (= {d['questions']} questions x {d['tree']}), KV cache length "
        f"{d['cache_len']} (= prompt {d['prompt_tokens']} + 3 x {d['max_new_tokens']} new + 2 x {d['turn_tokens']} "
        f"turn tokens), rows per device {d['sample_rows_per_device']}",
        f"training: microbatch {d['sft_rows']} rows x {d['seq_len']} tokens (SFT) / {d['dpo_rows']} rows x "
        f"{d['dpo_seq_len']} tokens (DPO), "
        f"rows per device {d['sft_rows_per_device']} / {d['dpo_rows_per_device']}, activation factor "
        f"{d['activation_factor']:.1f} x D x bytes per token per layer",
        "",
        f"{'per device':<16}" + "".join(f"{p:>13}" for p in plan.phases),
    ]
    order = ["parameters"] + [k for k in c if k != "parameters"]
    for comp in order:
        cells = []
        for comps in plan.phases.values():
            cells.append(fmt_bytes(c[comp]) if comp == "parameters" or comp in comps else "-")
        lines.append(f"{comp:<16}" + "".join(f"{x:>13}" for x in cells))
    lines.append(f"{'total':<16}" + "".join(f"{fmt_bytes(plan.phase_total(p)):>13}" for p in plan.phases))
    lines.append(
        f"{'fits':<16}" + "".join(f"{('yes' if plan.phase_total(p) <= plan.budget else 'NO'):>13}" for p in plan.phases)
    )
    f = plan.flops
    lines += [
        "",
        f"FLOPs per train step (analytic; 4*N*tok + 6*N_lora*tok + 12*L*H*hd*T*tok with all layers adapted): "
        f"SFT {fmt_flops(f['sft'])}, "
        f"DPO {fmt_flops(f['dpo'])}; per device SFT {fmt_flops(f['sft_per_device'])}, "
        f"DPO {fmt_flops(f['dpo_per_device'])} ({f['sft_tokens']:.0f} / {f['dpo_tokens']:.0f} tokens per step)",
    ]
    if plan.compiled:
        k = plan.compiled
        if "error" in k:
            lines.append(f"AOT check skipped: {k['error']}")
        else:
            lines.append(
                f"AOT check (1-layer SFT microbatch, compiled on {k['devices']} local {k['platform']} devices in "
                f"{k['compile_s']:.1f} s): XLA cost_analysis {fmt_flops(k['flops'])} per device vs analytic "
                f"{fmt_flops(k['analytic_flops'])} (ratio {k['flops'] / max(k['analytic_flops'], 1):.2f}); "
                f"XLA:{k['platform'].upper()} memory_analysis args {fmt_bytes(k['argument_bytes'])}, temp "
                f"{fmt_bytes(k['temp_bytes'])} (a 1-layer program; XLA:CPU upcasts bfloat16 and reuses buffers "
                "less than TPU/GPU, so read its temp as an upper bound)"
            )
    for n in plan.notes:
        lines.append(f"note: {n}")
    lines.append("verdict: " + ("fits" if plan.fits else "REFUSED (see below)"))
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict:
    """JSON-friendly view (for ``malt-jax plan --json``)."""
    return {
        "name": plan.name,
        "mesh": plan.mesh,
        "devices": plan.devices,
        "device": plan.device,
        "device_memory": plan.device_memory,
        "budget": plan.budget,
        "fits": plan.fits,
        "components": plan.components,
        "phases": {p: plan.phase_total(p) for p in plan.phases},
        "flops": plan.flops,
        "details": to_dict(plan.details),
        "compiled": plan.compiled,
        "notes": plan.notes,
        "refusal": plan.refusal(),
    }
