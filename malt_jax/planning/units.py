"""What ``malt-jax plan`` is given and the units it prints: memory sizes, ``--mesh`` strings,
the ``tpu_configs`` overlays (flattened into ``key=value`` overrides), byte and FLOP formats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "GiB",
    "parse_bytes",
    "parse_mesh",
    "fmt_bytes",
    "fmt_flops",
    "mesh_str",
    "load_overlay",
    "overlay_overrides",
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
    from malt_jax.parallel.sharding import MESH_AXES

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
