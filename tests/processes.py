"""Local multi-process runs for the multi-host tests: N processes started together, waited for
with one hard time limit (a test can never hang CI), every one required to exit 0."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(
    commands: Sequence[list[str]],
    envs: Sequence[dict],
    cwd: Path,
    timeout_s: float,
    meanwhile: Callable[[], None] | None = None,
) -> list[str]:
    """Starts every command (with its env), runs ``meanwhile()`` here while they run, and returns
    their outputs; fails the test on a timeout or a non-zero exit (showing the output's tail)."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in zip(commands, envs)
    ]
    logs = []
    try:
        if meanwhile is not None:
            meanwhile()
        for p in procs:
            logs.append(p.communicate(timeout=max(timeout_s - (time.perf_counter() - t0), 1))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{len(procs)} processes did not finish within {timeout_s} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        tail = "\n".join(line for line in log.splitlines() if not line.startswith("[Gloo]"))[-3000:]
        assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n{tail}"
    return logs
