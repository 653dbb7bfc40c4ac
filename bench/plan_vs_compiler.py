"""Planned per-device memory of the SFT / DPO steps and of sampling (one expansion batch) vs XLA's
memory_analysis of the same sharded step (``malt_jax.planning.aot.compile_step``) or expansion
(``compile_expansion``), for the 1B and 8B shapes cut to a few layers, on 8 fake
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
    ap.add_argument("--kinds", default="sft,dpo,sample", help="which phases to compare")
    a = ap.parse_args()
    kinds = tuple(a.kinds.split(","))
    import jax

    from malt_jax.config import load_run_config
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_expansion, compile_step, compiled_bytes
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
                    ],
                )
                plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200", prompt_tokens=256, turn_tokens=32)
                for kind in (k for k in ("sft", "dpo", "sample") if k in kinds and (remat or k != "sample")):
                    # (sampling has no backward: remat does not change it)
                    got = compiled_bytes(
                        compile_step(cfg, kind, mesh)
                        if kind != "sample"
                        else compile_expansion(cfg, mesh, prompt_tokens=256, turn_tokens=32)
                    )
                    want = plan.phase_total(kind)
                    print(
                        f"| {shape} | {layers} | {remat} | {kind} | {want / GiB:.2f} | {got / GiB:.2f} | "
                        f"{want / got:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
