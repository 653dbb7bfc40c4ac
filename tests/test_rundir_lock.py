"""One run directory, one writer: a second process on a run directory is refused at once, and the
lock of a killed process does not block the rerun (an OS lock, released when its process dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malt_jax import cli
from malt_jax.config import load_run_config
from malt_jax.stages import rundir
from malt_jax.workflows import pipeline
from malt_jax.workflows.study import run_study
from tests.fixtures import write_tiny_config
from tests.parity_task import ParityTask

ROOT = Path(__file__).resolve().parent.parent

ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "MALT_DISTRIBUTED": "0",
}

HOLD = """
import sys, time
from malt_jax.stages.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _config(tmp: Path) -> Path:
    return write_tiny_config(tmp / "cfg.yaml", tmp / "run", name="tiny-lock", extra="study: {train_sizes: [2, 4]}\n")


def _malt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "malt_jax", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _lock_holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_second_run_is_refused_at_once_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    cfg = _config(tmp_path)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "malt_jax", "run", str(cfg), "--no-progress"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = run_dir / ".lock.0"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):  # the first holds the lock
            assert first.poll() is None, f"the first run ended early: {first.stderr.read() if first.stderr else ''}"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        t0 = time.monotonic()
        second = _malt("run", str(cfg), "--no-progress", timeout=120)
        assert first.poll() is None, "the first run finished before the second was refused: no overlap tested"
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert err[-1].startswith("malt-jax: error: ") and "Traceback" not in second.stderr
        assert f"in use by another malt-jax process (pid {first.pid}" in err[-1] and str(run_dir) in err[-1]
        assert time.monotonic() - t0 < 60  # at once: no model load, no stage
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert (run_dir / ".lock.0").exists()  # the killed process's lock file stays, its lock does not
    # the rerun gets past the lock: its credit stage runs and asks for the expansion (not done yet
    # if the kill came first) or finishes
    rerun = _malt("credit", str(cfg), "--no-progress")
    assert "in use by another" not in rerun.stderr
    assert rerun.returncode == 0 or "run the expand stage first" in rerun.stderr, rerun.stderr[-2000:]
    assert (run_dir / "config.yaml").exists()


def test_run_study_and_stage_commands_are_refused_while_another_process_writes(tmp_path):
    cfg_path = _config(tmp_path)
    cfg = load_run_config(cfg_path)
    run_dir = Path(cfg.run_dir)
    holder = _lock_holder(run_dir)
    try:
        with pytest.raises(rundir.RunDirBusy, match=rf"in use by another malt-jax process \(pid {holder.pid}"):
            pipeline.run(cfg, task=ParityTask(), progress=False)
        with pytest.raises(rundir.RunDirBusy, match="one run directory takes one writer"):
            run_study(cfg, progress=False, task=ParityTask())
        assert cli.main(["eval", str(cfg_path), "--no-progress"]) == 2
        assert cli.main(["study", str(cfg_path), "--no-progress"]) == 2
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock.0"]  # nothing written, no stamp
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with rundir.lock_run_dir(run_dir):  # the dead holder's lock went with it
        pass


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    run_dir = tmp_path / "run"
    with rundir.lock_run_dir(run_dir), rundir.lock_run_dir(run_dir):  # e.g. run() calling run()
        assert len(rundir._LOCKS) == 1
    assert not rundir._LOCKS
    holder = _lock_holder(run_dir)  # released: another process can take it
    holder.kill()
    holder.wait(timeout=30)


def test_processes_of_one_multihost_run_lock_their_own_file(tmp_path, monkeypatch):
    """The processes of a multi-host run share the run directory by design: process i holds
    ``.lock.<i>``, so they do not refuse each other, while a second run's process i is refused."""
    run_dir = tmp_path / "run"
    holder = _lock_holder(run_dir)  # process 0 of some run
    try:
        monkeypatch.setattr(rundir.jax, "process_index", lambda: 1)
        with rundir.lock_run_dir(run_dir):
            assert (run_dir / ".lock.1").read_text().strip() == str(os.getpid())
        monkeypatch.setattr(rundir.jax, "process_index", lambda: 0)
        with pytest.raises(rundir.RunDirBusy), rundir.lock_run_dir(run_dir):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
