"""The machine a figure was measured on: CPU model, its vector instruction sets, cores, memory and
the JAX backend, recorded in every ``results/`` summary and ``bench/`` JSON (the same command runs
several times slower on an AVX2-only CPU than on one with AVX-512 and bf16 dot products)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

__all__ = ["VECTOR_FLAGS", "machine_info", "vector_isa"]

# the /proc/cpuinfo flags that decide XLA:CPU's matmul speed, widest last
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def _cpuinfo(path: Path) -> tuple[str, set[str]]:
    model, flags = "", set[str]()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm64
            flags = set(value.split())
    return model, flags


def vector_isa(flags: set[str]) -> str:
    """The vector extensions among ``flags`` that matter here, e.g. ``"avx2 fma"`` or
    ``"avx2 fma avx512f avx512_bf16"``; ``"asimd"``-style arm64 features are listed as they are."""
    known = [f for f in VECTOR_FLAGS if f in flags and f != "sse4_2" and f != "avx"]
    arm = sorted(f for f in flags if f in ("asimd", "sve", "sve2", "bf16", "i8mm"))
    return " ".join(known + arm) or "none of " + ", ".join(VECTOR_FLAGS)


def machine_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """``{"cpu", "isa", "cores", "memory_gb", "backend", "devices"}`` of this machine; ``backend``
    and ``devices`` only when JAX is already imported (this never starts a backend)."""
    import sys

    model, flags = _cpuinfo(Path(cpuinfo))
    info: dict = {
        "cpu": model or platform.processor() or platform.machine(),
        "isa": vector_isa(flags),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            devices = jax.devices()
            info["backend"] = devices[0].platform
            info["devices"] = f"{len(devices)} x {devices[0].device_kind}"
        except RuntimeError:
            pass
    return info
