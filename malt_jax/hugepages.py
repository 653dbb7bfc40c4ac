"""Transparent huge pages for XLA:CPU's buffers (Linux, glibc >= 2.35).

XLA:CPU allocates each program execution's buffers with ``malloc``; glibc serves blocks above
32 MiB with a fresh ``mmap`` and returns them with ``munmap``, so every execution touches its
temporaries for the first time again, one 4 KiB page fault at a time. A LoRA DPO step of the
bench (``bench/dpo_vs_trl.py``) took ~330,000 page faults and 0.6 s of kernel time per step.
With glibc's ``glibc.malloc.hugetlb=1`` tunable, malloc asks for transparent huge pages
(``madvise``), and the same step faults ~2,500 times (bench/README.md).

glibc reads tunables once, at process start, so :func:`reexec` restarts the current command
with ``GLIBC_TUNABLES`` extended when it would change something; the ``malt-jax`` command and
the bench scripts call it before anything else. Library users set the variable themselves::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

``MALT_JAX_HUGEPAGES=0`` turns the restart off. Computation results do not depend on it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_has_hugetlb() -> bool:
    lib, ver = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        major, minor = (int(x) for x in ver.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _thp_available(path: Path = THP_ENABLED) -> bool:
    """The kernel gives huge pages to ``madvise`` callers (mode ``[always]`` or ``[madvise]``)."""
    try:
        text = path.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def hugepage_env(env: Mapping[str, str], *, glibc_ok: bool, thp_ok: bool) -> dict[str, str] | None:
    """The environment to restart with, or None when nothing would change (already set, turned
    off with ``MALT_JAX_HUGEPAGES=0``, or not supported here)."""
    if env.get("MALT_JAX_HUGEPAGES", "1") == "0" or not (glibc_ok and thp_ok):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # set, by us or by the user (any value): leave it
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return new


def reexec() -> None:
    """Restarts this process (same interpreter, same command line) with glibc's huge-page
    tunable, unless it is set, turned off, or unsupported here; returns only in those cases."""
    if not sys.platform.startswith("linux"):
        return
    env = hugepage_env(os.environ, glibc_ok=_glibc_has_hugetlb(), thp_ok=_thp_available())
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
