"""`malt-jax rl` sharded: the policy-gradient step compiled with explicit shardings on a
{data: 2, fsdp: 2, tensor: 2} mesh, and a tiny RL run (the parity task, trees 2x2x2, 2 questions x 2
iterations, every role trained) that gives the adapters and metrics of one device on 8 fake CPU
devices (this pytest process) and as 2 ``jax.distributed`` processes x 4 devices (marked slow:
``make test-slow``).

Tolerances. The sampled trees must be identical (token counts, rewards: the same rows are trained
on). Metrics: rtol 1e-4, atol 1e-6 (the losses are near 0: float noise of ~1e-8). Adapters: every
element within 1e-6 except at most 1 % of them, and those within 2e-4 (2 % of the learning rate
1e-2): an Adam step moves a weight by up to lr whatever its gradient's size, so a gradient near
Adam's eps whose last bits differ (another reduction order: tensor-parallel partial sums, Gloo's
cross-process all-reduce) moves by a different fraction of lr (seen: one element of 256 off by 9e-5).
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
from malt_jax.roles import ROLES
from tests.fixtures import rl_metric_rows, write_tiny_config
from tests.processes import free_port, run_together

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 420  # hard cap per group of processes: the test can never hang CI
RL = [
    "rl.iterations=2",
    "rl.reference=base",
    "rl.questions_per_iteration=2",
    "rl.learning_rate=1e-2",
    "--no-progress",
    "--no-eval",
]
MESH = "mesh={data: 2, fsdp: 2, tensor: 2}"
TASK = "tests.parity_task:ParityTask"
LR = 1e-2


def _env(devices: int) -> dict[str, str]:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for k in ("MALT_DISTRIBUTED", "MALT_COORDINATOR", "MALT_NUM_PROCESSES", "MALT_PROCESS_ID"):
        env.pop(k, None)
    return env


def _config(tmp: Path, name: str) -> Path:
    return write_tiny_config(tmp / f"{name}.yaml", tmp / name, name="tiny-rl", task=TASK)


def _assert_same_adapters(got: Path, want: Path) -> None:
    moved = 0.0
    for r in ROLES:
        a, b = (
            load_file(str(want / "adapters" / f"{r}.safetensors")),
            load_file(str(got / "adapters" / f"{r}.safetensors")),
        )
        assert sorted(a) == sorted(b)
        for k in a:
            d = np.abs(a[k] - b[k])
            assert d.max() <= 2e-4, (r, k, float(d.max()))
            assert (d > 1e-6).mean() <= 0.01, (r, k, int((d > 1e-6).sum()), d.size)
            if k.endswith(".b"):
                moved = max(moved, float(np.abs(a[k]).max()))
    assert moved > 0.5 * LR, "the adapters did not move: the comparison would be vacuous"


def _assert_same_metrics(got: Path, want: Path) -> None:
    a, b = rl_metric_rows(want), rl_metric_rows(got)
    assert [(r["iteration"], r["role"], r["step"]) for r in a] == [(r["iteration"], r["role"], r["step"]) for r in b]
    assert [(r["iteration"], r["role"]) for r in a] == [(i, r) for i in (0, 1) for r in ROLES]
    for x, y in zip(a, b):
        # the same sampled trees: the same rows trained on
        for k in ("iteration_tokens", "num_tokens", "chain_accuracy", "groups", "reward_mean", "reward_std"):
            assert x[k] == y[k], (x["iteration"], x["role"], k)
        for k in (
            "loss",
            "pg_loss",
            "kl",
            "entropy",
            "grad_norm",
            "completion_length",
            "advantage_mean",
            "clip_ratio",
            "learning_rate",
        ):
            np.testing.assert_allclose(y[k], x[k], rtol=1e-4, atol=1e-6, err_msg=f"{x['iteration']} {x['role']} {k}")


def _same(a, b, tree) -> None:
    for x, sa, sb in zip(jax.tree.leaves(tree), jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert sa.is_equivalent_to(sb, np.ndim(x)), (sa, sb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run on 1 device (a subprocess) and on this process's 8 devices (mesh 2x2x2), together."""
    tmp = tmp_path_factory.mktemp("rl_sharded")
    one, eight = _config(tmp, "one"), _config(tmp, "eight")

    def sharded() -> None:
        assert jax.device_count() == 8 and jax.process_count() == 1
        assert cli.main(["rl", str(eight), MESH, *RL]) == 0

    run_together(
        [[sys.executable, "-m", "malt_jax", "rl", str(one), *RL]], [_env(1)], ROOT, TIMEOUT_S, meanwhile=sharded
    )
    return tmp / "one", tmp / "eight"


def test_pg_step_is_compiled_with_the_tables_shardings():
    """The sharded step takes the base params, the role's state and the batch rows as the SFT
    step does (``param_shardings`` / ``state_shardings`` / rows over data x fsdp) and returns the
    state sharded the same way."""
    from jax.sharding import PartitionSpec as P

    from malt_jax.config import LoraConfig, ModelConfig, TrainConfig
    from malt_jax.model.llama import init_params
    from malt_jax.model.lora import init_lora
    from malt_jax.parallel.sharding import make_mesh, param_shardings
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.pg_step import PGConfig, compiled_pg_step, pg_batch, pg_signature, place_pg_batch
    from malt_jax.training.stepper import Stepper, _Hashable, state_shardings
    from malt_jax.training.steps import TrainState

    cfg, lora = ModelConfig.tiny(n_layers=2), LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_up"))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    opt = make_optimizer(TrainConfig(), 10, 1e-2)
    stepper = Stepper("sft", cfg, lora, TrainConfig(batch_size=8), opt, mesh=mesh)
    base, state = stepper.place(
        init_params(cfg, jax.random.key(0)), TrainState.create(init_lora(cfg, lora, jax.random.key(1)), opt)
    )
    rng = np.random.default_rng(0)
    rows = [([int(t) for t in rng.integers(1, 200, 5)], [int(t) for t in rng.integers(1, 200, 4)]) for _ in range(8)]
    batch = pg_batch(rows, rng.normal(size=8).astype(np.float32), 4, 32, pad_id=0)
    batch["ref"] = np.zeros(batch["comp_index"].shape, np.float32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step = compiled_pg_step(
        cfg, 2.0, PGConfig(0.2, 0.04, "token_mean", 2), opt.update, mesh, _Hashable(abstract), pg_signature(batch)
    )
    placed = place_pg_batch(batch, mesh)
    compiled = step.lower(base, state, placed).compile()
    in_sh = compiled.input_shardings[0]
    _same(in_sh[0], param_shardings(base, mesh), base)
    _same(in_sh[1], state_shardings(state, mesh), state)
    _same(compiled.output_shardings[0], state_shardings(state, mesh), state)
    assert in_sh[0]["layers"]["w_up"].spec == P(None, "fsdp", "tensor")
    assert in_sh[2]["tokens"].spec == P(("data", "fsdp"), None) and in_sh[2]["adv"].spec == P(("data", "fsdp"))
    new, metrics = step(base, state, placed)
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
    assert new.adapter["layers"]["wq"]["a"].sharding.is_equivalent_to(state.adapter["layers"]["wq"]["a"].sharding, 3)


def test_sharded_rl_matches_one_device(runs):
    one, eight = runs
    _assert_same_metrics(eight, one)
    _assert_same_adapters(eight, one)


@pytest.mark.slow  # ~150 s on a 2-core machine (make test-slow); the single-process parts above stay in `make test`
@pytest.mark.multihost
def test_two_processes_match_one_process(runs, tmp_path_factory):
    """`malt-jax rl` as 2 jax.distributed processes (4 fake CPU devices each, one shared run
    directory, the same 2x2x2 mesh over both) == the single process's 8 devices."""
    _, eight = runs
    tmp = tmp_path_factory.mktemp("rl_two")
    two = _config(tmp, "two")
    env = {
        **_env(4),
        "MALT_DISTRIBUTED": "1",
        "MALT_COORDINATOR": f"127.0.0.1:{free_port()}",
        "MALT_NUM_PROCESSES": "2",
    }
    logs = run_together(
        [[sys.executable, "-m", "malt_jax", "rl", str(two), MESH, *RL]] * 2,
        [{**env, "MALT_PROCESS_ID": str(i)} for i in range(2)],
        ROOT,
        TIMEOUT_S,
    )
    run_dir = tmp / "two"
    _assert_same_metrics(run_dir, eight)
    _assert_same_adapters(run_dir, eight)
    # both processes finished the same run and printed the same last rows
    last = [[line for line in log.splitlines() if line.startswith(("G:", "V:", "R:"))] for log in logs]
    assert last[0] and last[0] == last[1]
    assert not list(run_dir.rglob("*.tmp")), "temporaries left behind"
    assert json.loads((run_dir / "rl" / "summary.json").read_text())["iterations"] == 2
