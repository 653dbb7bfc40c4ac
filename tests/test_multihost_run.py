"""`malt-jax run` as 2 local `jax.distributed` processes (4 fake CPU devices each) == 1 process x 8.

Both processes run the same command on one shared run directory (as on a TPU pod, where every
worker runs the same `malt-jax run`); the expansion arrays, credit sets, adapters and evaluation
rows they leave must be those of the single-process run of the same config, and the files they
share must be whole (written once, or atomically by both).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from malt_jax import cli
from tests.fixtures import write_tiny_config
from tests.processes import free_port, run_together

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 420  # hard cap: the test can never hang CI


def _config(tmp: Path, name: str) -> Path:
    return write_tiny_config(tmp / f"{name}.yaml", tmp / name, name="tiny-multihost")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh_run")
    two_cfg, one_cfg = _config(tmp, "two"), _config(tmp, "one")
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MALT_DISTRIBUTED": "1",
        "MALT_COORDINATOR": f"127.0.0.1:{port}",
        "MALT_NUM_PROCESSES": "2",
    }

    def reference() -> None:  # the single-process run, here (8 fake devices), while they run
        assert jax.device_count() == 8 and jax.process_count() == 1
        assert cli.main(["run", str(one_cfg), "--no-progress"]) == 0

    logs = run_together(
        [[sys.executable, "-m", "malt_jax", "run", str(two_cfg), "--no-progress"]] * 2,
        [{**env, "MALT_PROCESS_ID": str(i)} for i in range(2)],
        ROOT,
        TIMEOUT_S,
        meanwhile=reference,
    )
    return tmp / "one", tmp / "two", logs


def test_expansion_and_credit_sets_are_identical(runs):
    one, two, _ = runs
    npz = sorted(p.name for p in (one / "expansion").glob("*.npz"))
    assert npz and npz == sorted(p.name for p in (two / "expansion").glob("*.npz"))
    for name in npz:
        a, b = np.load(one / "expansion" / name), np.load(two / "expansion" / name)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
    for f in sorted((one / "credit").iterdir()):
        assert (two / "credit" / f.name).read_text() == f.read_text(), f.name
    assert json.loads((one / "credit" / "summary.json").read_text())["refiner/sft"] > 0


def test_adapters_match_to_float_tolerance(runs):
    one, two, _ = runs
    files = sorted(p.name for p in (one / "adapters").glob("*.safetensors"))
    assert len(files) == 6  # G/V/R, after SFT and final
    for name in files:
        a, b = load_file(str(one / "adapters" / name)), load_file(str(two / "adapters" / name))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")
    # LoRA's B starts at zero: a non-zero B is an adapter that training moved (the held-out
    # selection may keep a role's untrained start)
    trained = [
        n
        for n in files
        if any(np.abs(v).max() > 0 for k, v in load_file(str(one / "adapters" / n)).items() if k.endswith(".b"))
    ]
    assert trained, "no adapter was trained: the comparison would be vacuous"
    for role in ("G", "V", "R"):  # the same steps, losses and gradient norms
        h1, h2 = (
            [json.loads(x) for x in (d / "adapters" / f"{role}_history.jsonl").read_text().splitlines()]
            for d in (one, two)
        )
        assert [h["step"] for h in h1] == [h["step"] for h in h2]
        for a, b in zip(h1, h2):
            for k in ("loss", "grad_norm", "learning_rate"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"{role} step {a['step']} {k}")


def test_evaluation_rows_and_summary_are_identical(runs):
    one, two, logs = runs
    names = sorted(p.name for p in (one / "eval").glob("*.jsonl"))
    assert names == ["chain.jsonl", "malt.jsonl", "single-greedy.jsonl", "single.jsonl"]
    for name in names:
        assert (two / "eval" / name).read_text() == (one / "eval" / name).read_text(), name
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["systems"] == s2["systems"] and s1["comparisons"] == s2["comparisons"]
    # both processes printed the same table
    tables = [[line for line in log.splitlines() if line.startswith(("single", "chain", "malt"))] for log in logs]
    assert tables[0] and tables[0] == tables[1]


def test_shared_files_are_whole(runs):
    _, two, _ = runs
    assert not [p for p in two.rglob("*.tmp")], "temporaries left behind"
    assert (two / "report.md").read_text().count("| malt+MV@3 |") == 1
    events = sorted(two.glob("tensorboard/**/events.out.tfevents.*"))
    if events:  # tensorboardX installed: one writer, one file per directory
        assert len({e.parent for e in events}) == len(events)
