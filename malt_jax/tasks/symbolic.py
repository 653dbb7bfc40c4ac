"""Symbolic equivalence under a hard time bound, via a persistent sympy worker process.

sympy's ``simplify`` can run for minutes or exhaust memory on adversarial input, and threads
cannot be interrupted, so checks run in a separate Python process (``_sympy_worker``) started
with ``subprocess`` (fork+exec: safe in a process that already initialised JAX). Each request
has a deadline; on overrun the worker is killed (and restarted lazily on the next request) and
the answer counts as "not equal". The worker caps its address space (``RLIMIT_AS``).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 60.0
WORKER_MEMORY_MB = 1024


class SympyWorker:
    """One worker process answering equivalence queries; thread-safe."""

    def __init__(self, memory_mb: int = WORKER_MEMORY_MB) -> None:
        self.memory_mb = memory_mb
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def equal(self, a: str, b: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool | None:
        """Whether sympy proves ``a == b`` (whitelisted infix); None on timeout or failure."""
        request = (json.dumps({"a": a, "b": b}) + "\n").encode()
        with self._lock:
            try:
                proc = self._ensure_started()
                assert proc.stdin is not None
                proc.stdin.write(request)
                proc.stdin.flush()
                line = self._readline(time.monotonic() + timeout)
            except (OSError, TimeoutError, ValueError):
                self._kill()
                return None
        try:
            return bool(json.loads(line)["equal"])
        except (ValueError, KeyError, TypeError):
            return None

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "malt_jax.tasks._sympy_worker", str(self.memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.restarts += 1
        if self._readline(time.monotonic() + STARTUP_TIMEOUT_S) != b"ready":
            raise OSError("sympy worker did not start")
        return self._proc

    def _readline(self, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sympy worker timed out")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise OSError("sympy worker exited")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.strip()

    def _kill(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()


_WORKER: SympyWorker | None = None
_WORKER_LOCK = threading.Lock()


def shared_worker() -> SympyWorker:
    """The process-wide worker (started lazily, stopped at exit)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = SympyWorker()
            atexit.register(_WORKER.close)
        return _WORKER


def symbolic_equal(a: str, b: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """True only when the worker proves equivalence within ``timeout`` seconds."""
    return shared_worker().equal(a, b, timeout) is True
