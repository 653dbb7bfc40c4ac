"""glibc malloc settings for XLA:CPU's buffers (Linux): memory reused, not faulted in again.

XLA:CPU allocates every program execution's buffers with ``malloc`` and frees them after it.
With glibc's defaults, blocks above the (dynamic, at most 32 MiB) mmap threshold get a fresh
``mmap`` and are ``munmap``-ed on free, and the per-thread arenas return freed memory with
``madvise(MADV_DONTNEED)``; either way the next execution touches its temporaries for the first
time again, one 4 KiB page fault each. A LoRA DPO step of ``bench/dpo_vs_trl.py`` took ~300,000
page faults and ~0.55 s of kernel time per step. With one arena, no mmap and no trimming
(:data:`TUNABLES`), freed blocks stay in the process and are reused: ~0 faults per step once the
heap has grown, and the step ~10 % faster (bench/README.md). The cost: memory freed after a
peak is kept by the process instead of going back to the system.

glibc reads its tunables once, at process start, so :func:`reexec` restarts the current command
with ``GLIBC_TUNABLES`` extended; the ``malt-jax`` command and the bench scripts call it before
anything else. Library users set the variable themselves (``export GLIBC_TUNABLES=`` followed
by :data:`TUNABLES`, before starting Python).

``MALT_JAX_MALLOC=0`` turns the restart off; a ``GLIBC_TUNABLES`` that already sets any malloc
tunable is left as it is. Computation results do not depend on it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["TUNABLES", "tuned_env", "reexec"]

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def tuned_env(env: Mapping[str, str], *, glibc: bool) -> dict[str, str] | None:
    """The environment to restart with, or None when nothing would change (already set, turned
    off with ``MALT_JAX_MALLOC=0``, not glibc, or malloc tunables chosen by the user)."""
    if env.get("MALT_JAX_MALLOC", "1") == "0" or not glibc:
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:  # set, by us after a restart or by the user: leave it
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    return new


def reexec() -> None:
    """Restarts this process (same interpreter, same command line) with :data:`TUNABLES`, unless
    they are set, turned off, or not applicable here; returns only in those cases."""
    if not sys.platform.startswith("linux"):
        return
    env = tuned_env(os.environ, glibc=_is_glibc())
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
