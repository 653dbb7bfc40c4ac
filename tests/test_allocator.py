"""allocator: the restart with glibc's malloc tunables, and their effect (no page faults when a
freed block is allocated again)."""

import os
import subprocess
import sys
import textwrap

import pytest

from malt_jax.runtime import allocator
from malt_jax.runtime.allocator import TUNABLES, tuned_env


def test_env_adds_the_tunables_once_and_keeps_other_tunables():
    assert tuned_env({}, glibc=True)["GLIBC_TUNABLES"] == TUNABLES
    env = tuned_env({"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on", "X": "1"}, glibc=True)
    assert env == {"GLIBC_TUNABLES": f"glibc.cpu.x86_ibt=on:{TUNABLES}", "X": "1"}
    # already set (by us after a restart, or malloc tunables of the user's): nothing to do, no loop
    assert tuned_env({"GLIBC_TUNABLES": TUNABLES}, glibc=True) is None
    assert tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, glibc=True) is None
    # turned off, or not glibc
    assert tuned_env({"MALT_JAX_MALLOC": "0"}, glibc=True) is None
    assert tuned_env({}, glibc=False) is None


SCRIPT = textwrap.dedent(
    """
    import ctypes, os, resource, sys, threading
    from malt_jax.runtime.allocator import reexec
    reexec()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 * 2**20  # XLA:CPU's pattern: a big buffer malloc-ed, written, freed, again and again
    faults = []

    def work():
        for i in range(4):
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

    t = threading.Thread(target=work)  # XLA allocates from its worker threads
    t.start()
    t.join()
    print(os.environ.get("GLIBC_TUNABLES"), faults[1:], sys.argv[1:])
    """
)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and allocator._is_glibc()), reason="needs Linux with glibc")
def test_restart_reuses_freed_memory_and_keeps_the_command_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALT_JAX_MALLOC")}

    def run(extra, *args):
        out = subprocess.run(
            [sys.executable, str(script), *args], env={**env, **extra}, capture_output=True, text=True, check=True
        )
        tunables, rest = out.stdout.strip().split(" ", 1)
        faults, argv = rest.split("] ", 1)
        return tunables, [int(x) for x in faults.strip("[").split(",")], argv

    tunables, faults, argv = run({}, "a b", "--c")
    assert tunables == TUNABLES and argv == "['a b', '--c']"
    assert max(faults) < 100  # the freed 64 MiB block is reused: no page is faulted in again
    # turned off: glibc's defaults mmap the block and unmap it on free, so it faults in every time
    tunables, faults, _ = run({"MALT_JAX_MALLOC": "0"})
    assert tunables == "None" and min(faults) > 64 * 2**20 // 4096 // 2
