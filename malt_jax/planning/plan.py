"""A per-device memory and FLOP plan (:class:`Plan`) and how it reads: the table ``malt-jax plan``
prints, the refusal naming the overflowing component and what to change, the JSON view.
:func:`malt_jax.planning.memory.make_plan` makes one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from malt_jax.config import to_dict
from malt_jax.planning.units import GiB, fmt_bytes, fmt_flops, mesh_str

__all__ = [
    "DEVICE_HBM",
    "DEFAULT_DEVICE",
    "USABLE_FRACTION",
    "PlanError",
    "Plan",
    "ADVICE",
    "refusal",
    "table",
    "plan_dict",
]

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


class PlanError(ValueError):
    """The configuration does not fit the device memory budget (the message says why)."""


@dataclasses.dataclass
class Plan:
    """Per-device memory (bytes) and FLOPs of a run on a mesh; see the module docstring."""

    name: str
    mesh: dict[str, int]
    devices: int
    device: str
    device_memory: int
    usable: float
    n_params: int  # ModelConfig.n_params
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
        """The refusal message ('' if the plan fits; :func:`refusal`)."""
        return refusal(self)

    def check(self) -> Plan:
        """Raises :class:`PlanError` (with :meth:`refusal`) if the plan does not fit."""
        if not self.fits:
            raise PlanError(self.refusal())
        return self

    def table(self) -> str:
        """The text table ``malt-jax plan`` prints (:func:`table`)."""
        return table(self)


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
ADVICE["rl_states"] = (
    "train fewer roles at once (rl.roles), lower lora.rank or use fewer lora.targets, or raise mesh fsdp"
)
ADVICE["rl_held"] = ADVICE["rl_states"]
ADVICE["gradients_rl"] = ADVICE["gradients"]
ADVICE["activations_rl"] = (
    "lower rl.micro_batch (rows per forward / backward pass), shorten the rows (sampling budgets, "
    "train.max_seq_len) or add data/fsdp devices"
)
ADVICE["logits_rl"] = (
    "lower rl.micro_batch or the role budgets (sampling.max_new_tokens), add data/fsdp devices or raise tensor "
    "(splits the vocab)"
)
ADVICE["prefill_rl"] = (
    "lower tree.questions_per_batch (the rollout re-encodes each level's parent contexts with the role's "
    "adapter), rl.questions_per_iteration or sampling.max_new_tokens, add data/fsdp devices or raise tensor "
    "(splits the heads)"
)
ADVICE["rl_batch"] = "lower rl.questions_per_iteration or the tree's branching, or add data/fsdp devices"
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
    if "rl_iteration" in f:
        lines.append(
            f"RL iteration (analytic; rl.questions_per_iteration {d['rl_questions']}, sampled "
            f"{d['rl_sample_questions']} at a time): rollout {fmt_flops(f['rl_rollout'])} "
            f"({f['rl_rollout_tokens']:.0f} tokens encoded / sampled) + update {fmt_flops(f['rl_update'])} "
            f"(rows {d['rl_rows']} of <= {d['rl_seq_len']} tokens, {d['rl_scored']} scored, in microbatches of "
            f"{d['rl_micro_batch']}, {d['rl_rows_per_device']} per device) = {fmt_flops(f['rl_iteration'])}; "
            f"per device {fmt_flops(f['rl_iteration_per_device'])}"
        )
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
