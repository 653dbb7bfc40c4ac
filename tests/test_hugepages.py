"""hugepages: the restart with glibc's huge-page malloc tunable, and its effect."""

import subprocess
import sys
import textwrap

import pytest

from malt_jax import hugepages
from malt_jax.hugepages import TUNABLE, hugepage_env


def test_env_adds_the_tunable_once_and_keeps_other_tunables():
    assert hugepage_env({}, glibc_ok=True, thp_ok=True)["GLIBC_TUNABLES"] == TUNABLE
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}, glibc_ok=True, thp_ok=True)
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}", "X": "1"}
    # already set (by us after a restart, or by the user to any value): nothing to do, no loop
    assert hugepage_env({"GLIBC_TUNABLES": TUNABLE}, glibc_ok=True, thp_ok=True) is None
    assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc_ok=True, thp_ok=True) is None
    # turned off, or not supported here
    assert hugepage_env({"MALT_JAX_HUGEPAGES": "0"}, glibc_ok=True, thp_ok=True) is None
    assert hugepage_env({}, glibc_ok=False, thp_ok=True) is None
    assert hugepage_env({}, glibc_ok=True, thp_ok=False) is None


@pytest.mark.parametrize(
    "text, ok",
    [("always [madvise] never\n", True), ("[always] madvise never\n", True), ("always madvise [never]\n", False)],
)
def test_thp_modes(tmp_path, text, ok):
    f = tmp_path / "enabled"
    f.write_text(text)
    assert hugepages._thp_available(f) is ok
    assert hugepages._thp_available(tmp_path / "missing") is False


SCRIPT = textwrap.dedent(
    """
    import ctypes, os, sys
    from malt_jax.hugepages import reexec
    reexec()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    n = 256 * 2**20  # a plain malloc, as XLA:CPU's buffers (numpy madvises its own big arrays)
    ctypes.memset(libc.malloc(n), 1, n)
    huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:"))
    print(os.environ.get("GLIBC_TUNABLES"), huge, sys.argv[1:])
    """
)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hugepages._glibc_has_hugetlb() and hugepages._thp_available()),
    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise/always mode",
)
def test_restart_gets_huge_pages_and_keeps_the_command_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "MALT_JAX_HUGEPAGES")}
    out = subprocess.run(
        [sys.executable, str(script), "a b", "--c"], env=env, capture_output=True, text=True, check=True
    )
    tunables, huge_kb, argv = out.stdout.strip().split(" ", 2)
    assert tunables == TUNABLE and argv == "['a b', '--c']"
    assert int(huge_kb) >= 128 * 1024  # most of the array sits in 2 MiB pages
    # turned off: no restart, 4 KiB pages (THP in "always" mode would still give huge pages)
    off = subprocess.run(
        [sys.executable, str(script)],
        env={**env, "MALT_JAX_HUGEPAGES": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert off.stdout.split()[0] == "None"
    if "[madvise]" in hugepages.THP_ENABLED.read_text():
        assert int(off.stdout.split()[1]) < 64 * 1024
