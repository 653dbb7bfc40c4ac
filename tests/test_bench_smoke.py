"""The accelerator roofline benchmark (bench/gpu_roofline.py) is run only where a GPU is lent,
so its --quick CPU path is smoke-tested here (slow: it compiles three programs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_roofline_quick_runs_on_cpu(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": ""}
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_roofline.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [row["what"] for row in res["rows"]] == ["LoRA SFT step", "LoRA DPO step", "decode step, batch 1"]
    for row in res["rows"]:
        assert row["median s"] > 0 and row["tokens/s"] > 0
    assert 0 < res["rows"][0]["MFU vs measured peak %"] < 100


@pytest.mark.slow
def test_dpo_step_options_quick_runs_and_the_variants_agree(tmp_path):
    """bench/dpo_step_options.py: the three variants of the DPO step (scan + dense attention,
    unstacked layers, + key blocks) run and give the same loss."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "", "MALT_JAX_MALLOC": "0"}
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dpo_step_options.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["scan, dense", "unstacked", "unstacked + key blocks"]
    assert all(row["median step s"] > 0 for row in rows)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
