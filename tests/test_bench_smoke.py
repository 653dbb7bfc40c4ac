"""Smoke runs of benchmarks whose --quick path is not exercised elsewhere: the accelerator
roofline (bench/gpu_roofline.py, run only where a GPU is lent) on CPU, and the DPO step
options (bench/dpo_step_options.py). Slow: each compiles several programs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, tmp_path: Path, timeout: int, **env_extra: str) -> dict:
    """Runs ``bench/<script> --quick`` on one CPU device and returns its JSON results."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "", **env_extra}
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_roofline_quick_runs_on_cpu(tmp_path):
    res = _run_quick("gpu_roofline.py", tmp_path, 300)
    assert [row["what"] for row in res["rows"]] == ["LoRA SFT step", "LoRA DPO step", "decode step, batch 1"]
    for row in res["rows"]:
        assert row["median s"] > 0 and row["tokens/s"] > 0
    assert 0 < res["rows"][0]["MFU vs measured peak %"] < 100


@pytest.mark.slow
def test_dpo_step_options_quick_runs_and_the_variants_agree(tmp_path):
    """bench/dpo_step_options.py: the variants of the DPO step (scan + dense attention, unstacked
    layers, + key blocks, + bf16) run; the f32 ones give the same loss, the bf16 one a close one."""
    rows = _run_quick("dpo_step_options.py", tmp_path, 600, MALT_JAX_MALLOC="0")["rows"]
    assert [row["variant"] for row in rows] == [
        "scan, dense",
        "unstacked",
        "unstacked + key blocks",
        "unstacked + key blocks + bf16",
    ]
    assert all(row["median step s"] > 0 for row in rows)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert rows[3]["loss"] != rows[0]["loss"] and rows[3]["loss"] == pytest.approx(rows[0]["loss"], rel=0.05)


def test_pretrain_step_quick_runs_and_both_layouts_give_the_same_gradients(tmp_path):
    res = _run_quick("pretrain_step.py", tmp_path, 300, MALT_JAX_MALLOC="0")
    assert {r["variant"] for r in res["rows"]} == {"flat", "3d", "forward"}
    assert res["max_grad_diff"] < 1e-5 and res["machine"]["isa"]


def test_pretrain_vs_torch_quick_runs_and_both_sides_compute_the_same_step(tmp_path):
    """bench/pretrain_vs_torch.py at batch 2 x 32: the malt-jax pretraining step and the PyTorch
    module of bench/torch_llama.py give the same loss, gradients and loss after one AdamW step from
    the same weights, and every variant is timed. Needs torch in .venv-peers (not in CI: skipped)."""
    peers = ROOT / ".venv-peers" / "bin" / "python"
    if not peers.exists() or subprocess.run([str(peers), "-c", "import torch"], capture_output=True).returncode:
        pytest.skip("no torch in .venv-peers (python3 -m venv .venv-peers && .venv-peers/bin/pip install torch numpy)")
    res = _run_quick("pretrain_vs_torch.py", tmp_path, 300, MALT_JAX_MALLOC="0")
    parity = res["parity"]
    assert parity["ok"] and parity["loss_rel_diff"] < 1e-4 and parity["loss_after_step_rel_diff"] < 1e-4
    assert parity["grad_max_rel_diff"] < 1e-4
    names = {r["variant"] for r in res["rows"]}
    assert {"malt-jax", "malt-jax grad", "malt-jax forward", "PyTorch 2t", "PyTorch 1t"} <= names
    assert all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in res["rows"])
    assert res["ratio_jax_over_torch"] > 0 and res["n_params"] == 1_090_688
