"""Planned per-device memory of the SFT / DPO steps, of sampling (one expansion batch) and of the RL
rollout / policy-gradient update vs XLA's memory_analysis of the same sharded step
(``malt_jax.planning.aot.compile_step`` / ``compile_pg_step``: one microbatch of ``rl.micro_batch``
8 rows, compared with the plan's ``rl_update`` less what lives outside the step, ``rl_held`` and
``rl_batch``) or expansion (``compile_expansion``; the rollout's with one adapter per role, mode
"fork", vs ``rl_sample`` less ``rl_states``), for the 1B and 8B shapes cut to a few layers, on 8 fake
CPU devices with the configs' fsdp=8 mesh, in float32 (XLA:CPU computes bfloat16 dots in
float32). Prints a markdown table; nothing is allocated (abstract shapes).

    python bench/plan_vs_compiler.py [--layers 2,4]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--kinds", default="sft,dpo,sample,rollout,rl", help="which phases to compare")
    a = ap.parse_args()
    kinds = tuple(a.kinds.split(","))
    import jax

    from malt_jax.config import load_run_config
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_expansion, compile_pg_step, compile_step, compiled_bytes
    from malt_jax.planning.memory import make_plan

    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
    print("| shape | layers | remat | step | planned GiB | XLA GiB | planned / XLA |")
    print("|---|---|---|---|---|---|---|")
    for shape in ("llama32_1b_gsm8k", "llama31_8b_gsm8k"):
        for layers in (int(x) for x in a.layers.split(",")):
            for remat in (True, False):
                cfg = load_run_config(
                    ROOT / "experiments" / f"{shape}.yaml",
                    [
                        f"model.n_layers={layers}",
                        "model.dtype=float32",
                        "model.param_dtype=float32",
                        f"model.remat={str(remat).lower()}",
                        "mesh={data: 1, fsdp: 8, tensor: 1}",
                        # an RL section (the rl_* phases; the other phases do not depend on it)
                        "rl.iterations=1",
                        "rl.reference=base",
                        "rl.micro_batch=8",
                    ],
                )
                plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200", prompt_tokens=256, turn_tokens=32)
                steps = ("sft", "dpo", "sample", "rollout", "rl")
                for kind in (k for k in steps if k in kinds and (remat or k not in ("sample", "rollout"))):
                    # (sampling has no backward: remat does not change it)
                    if kind in ("sample", "rollout"):
                        mode = "fork" if kind == "rollout" else "extend"
                        got = compiled_bytes(compile_expansion(cfg, mesh, prompt_tokens=256, turn_tokens=32, mode=mode))
                    elif kind == "rl":
                        got = compiled_bytes(compile_pg_step(cfg, mesh, prompt_tokens=256, turn_tokens=32))
                    else:
                        got = compiled_bytes(compile_step(cfg, kind, mesh))
                    c = plan.components
                    if kind == "rl":
                        want = plan.phase_total("rl_update") - c["rl_held"] - c["rl_batch"]
                    elif kind == "rollout":
                        want = plan.phase_total("rl_sample") - c["rl_states"]
                    else:
                        want = plan.phase_total(kind)
                    print(
                        f"| {shape} | {layers} | {remat} | {kind} | {want / GiB:.2f} | {got / GiB:.2f} | "
                        f"{want / got:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
