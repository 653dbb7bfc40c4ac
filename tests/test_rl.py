"""malt-jax rl: online multi-agent GRPO on the tiny random model and the parity task (trees 2x2x2,
2 questions per iteration, 6-token turns): metrics of every role, exact resume, the reference
policies, the token budget, and configs refused before any work."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malt_jax import cli
from malt_jax.config import ConfigError, RunConfig, load_run_config, to_dict
from malt_jax.roles import ROLES
from malt_jax.runtime import tblog
from malt_jax.stages.eval import System
from malt_jax.stages.rl import iteration_questions
from malt_jax.stages.rundir import RunDirError, load_adapters, save_adapter
from malt_jax.training.pg_step import batch_logps, pg_batch
from malt_jax.workflows.rl import METRIC_KEYS, initial_adapters, run_rl
from tests.fixtures import RL, rl_config, rl_metric_rows, snapshot, tiny_model, uninterrupted_rl, write_tiny_config
from tests.parity_task import ParityTask

ONE_TREE = 2 * 6 + 4 * 6 + 8 * 6  # tokens of one 2x2x2 tree at 6 tokens per turn


def _cfg(tmp: Path, run: str = "out", extra: tuple[str, ...] = ()) -> RunConfig:
    return rl_config(tmp, RL, run, extra)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def full(tmp_path_factory, model):
    """An uninterrupted 2-iteration run (reference: the base model)."""
    return uninterrupted_rl(_cfg(tmp_path_factory.mktemp("rl")), model)


def test_two_iterations_write_metrics_of_every_role_and_change_the_adapters(full):
    cfg, summary = full
    run_dir = Path(cfg.run_dir)
    rows = rl_metric_rows(run_dir)
    assert [(r["iteration"], r["role"]) for r in rows] == [(i, r) for i in (0, 1) for r in ROLES]
    for row in rows:
        assert set(METRIC_KEYS) <= set(row), sorted(set(METRIC_KEYS) - set(row))
        assert all(math.isfinite(row[k]) for k in METRIC_KEYS)
        assert row["completion_length"] > 0 and 0 <= row["clip_ratio"] <= 1
    tokens = [r["num_tokens"] for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] == summary["num_tokens"] > tokens[0] > 0
    assert summary["iterations"] == 2 and summary["stopped_by"] == "iterations"
    start, _ = initial_adapters(cfg)
    final, _ = load_adapters(run_dir)  # the train stage's layout, checked against config.yaml
    assert final is not None
    for r in ROLES:
        b = np.asarray(final[r]["layers"]["wq"]["b"])
        assert np.abs(b).max() > 0 and np.abs(np.asarray(start[r]["layers"]["wq"]["b"])).max() == 0, r
    if tblog.available():
        assert all(list((run_dir / "tensorboard" / r / "rl").glob("events.out.tfevents.*")) for r in ROLES)


def test_kl_is_zero_at_the_first_iteration_when_the_reference_is_the_start(full):
    rows = rl_metric_rows(Path(full[0].run_dir))
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-6) for r in rows if r["iteration"] == 0)
    assert all(r["kl"] > 0 for r in rows if r["iteration"] == 1)  # the adapters moved away from it


def test_resume_after_a_stop_gives_the_uninterrupted_adapters(full, tmp_path, model):
    cfg = _cfg(tmp_path)
    stopped = run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False, stop_after=1)
    run_dir = Path(cfg.run_dir)
    assert stopped["stopped_at"] == 1 and not (run_dir / "adapters").exists()
    assert {r["iteration"] for r in rl_metric_rows(run_dir)} == {0}
    run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)
    resumed, _ = load_adapters(run_dir)
    uninterrupted, _ = load_adapters(Path(full[0].run_dir))
    assert resumed is not None and uninterrupted is not None
    for r in ROLES:
        for a, b in zip(jax.tree.leaves(resumed[r]), jax.tree.leaves(uninterrupted[r])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    skip = {"iteration_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in skip} for r in rows]  # noqa: E731
    assert strip(rl_metric_rows(run_dir)) == strip(rl_metric_rows(Path(full[0].run_dir)))


def test_sft_reference_starts_from_the_sft_adapters(tmp_path, model):
    """rl.reference: sft starts from (and keeps the KL to) another run's SFT adapters; only the
    roles in rl.roles are trained; the final adapters are evaluated by run_eval."""
    sft = tmp_path / "sft"
    (sft / "adapters").mkdir(parents=True)
    base_cfg = _cfg(tmp_path, "probe")
    fresh, _ = initial_adapters(base_cfg)
    rng = np.random.default_rng(0)
    for r in ROLES:  # non-trivial SFT adapters
        ad = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32), fresh[r])
        save_adapter(ad, sft / "adapters" / f"{r}_sft.safetensors")
    cfg = _cfg(tmp_path, "rl_sft", ("rl.reference=sft", f"rl.sft_run={sft}", "rl.iterations=1", "rl.roles=[V]"))
    s = run_rl(cfg, model=model, task=ParityTask(), progress=False, systems=[System("malt", 3, 1, False, True)])
    rows = rl_metric_rows(Path(cfg.run_dir))
    assert [r["role"] for r in rows] == ["V"] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert set(s["eval"]) == {"malt"} and 0 <= s["eval"]["malt"] <= 1
    final, _ = load_adapters(Path(cfg.run_dir))
    start, ref = initial_adapters(cfg)
    assert final is not None
    for r in ROLES:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final[r]), jax.tree.leaves(start[r])))
        assert same == (r != "V"), r  # G and R keep their SFT adapters, V is trained
        assert ref[r] is not None


def test_token_budget_and_several_updates_per_iteration(tmp_path, model):
    extra = (f"rl.token_budget={ONE_TREE}", "rl.roles=[G]", "rl.updates_per_iteration=2")
    cfg = _cfg(tmp_path, extra=extra)
    s = run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)
    assert s["iterations"] == 1 and s["stopped_by"] == "token_budget" and s["num_tokens"] >= ONE_TREE
    rows = rl_metric_rows(Path(cfg.run_dir))
    assert [(r["role"], r["update"], r["step"]) for r in rows] == [("G", 0, 1), ("G", 1, 2)]
    # the first update's ratio to the behaviour policy (the adapter before it) is 1: nothing clipped
    assert rows[0]["clip_ratio"] == 0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl"] > 0 and all(math.isfinite(r["pg_loss"]) for r in rows)
    again = run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)  # finished: no new iteration
    assert again["iterations"] == 1 and again["num_tokens"] == s["num_tokens"]


def test_pg_rows_score_the_sampled_tokens_at_the_sampling_temperature(model):
    """A packed row's log-probs are those of its completion tokens after its context, of the
    logits / temperature (a plain forward pass of prompt + completion as the reference)."""
    from malt_jax.model.llama import causal_positions, forward

    rows = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12, 13]), ([7, 7], [3])]
    batch = pg_batch(rows, np.array([1.0, -1.0, 0.5]), 2, 64, pad_id=0)
    assert batch["tokens"].shape[0] == 4 and batch["adv"].tolist() == [1.0, -1.0, 0.5, 0.0]
    lp = batch_logps(model.params, None, batch, 2, model.cfg, 1.0, temperature=0.5)
    for b, (p, c) in enumerate(rows):
        seq = jnp.asarray([p + c])
        logits, _ = forward(model.params, seq, causal_positions(1, seq.shape[1]), model.cfg)
        want = jax.nn.log_softmax(logits[0, len(p) - 1 : len(p) + len(c) - 1].astype(jnp.float32) / 0.5)
        np.testing.assert_allclose(lp[b, : len(c)], np.asarray(want)[np.arange(len(c)), c], rtol=1e-5, atol=1e-5)
        assert not lp[b, len(c) :].any()
    assert not lp[3].any()  # the padding row


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_pg_step_in_microbatches_equals_one_pass(model, loss_agg):
    """Rows of unequal lengths and advantages: two microbatches of two rows give the update and
    the metrics of one pass over the four rows."""
    from malt_jax.config import TrainConfig
    from malt_jax.model.lora import init_lora
    from malt_jax.training.optim import make_optimizer
    from malt_jax.training.pg_step import PGConfig, compiled_pg_step
    from malt_jax.training.steps import TrainState

    lora = load_run_config(None, ["model_preset=tiny", "lora.rank=2", "lora.targets=[wq, wv]"]).lora
    adapter = init_lora(model.cfg, lora, jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # b != 0: a policy that is not the base
    rows = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12, 13, 14, 15]), ([7, 7], [3]), ([1, 2], [3, 4, 5])]
    batch = pg_batch(rows, np.array([1.0, -1.0, 0.5, -0.5]), 2, 64, pad_id=0)
    batch["ref"] = batch_logps(model.params, None, batch, 2, model.cfg, 8.0)
    opt = make_optimizer(TrainConfig(), 10, 1e-2)
    out = []
    for accum in (1, 2):
        state = TrainState.create(adapter, opt)
        step = compiled_pg_step(model.cfg, 8.0, PGConfig(0.2, 0.1, loss_agg, accum), opt.update)
        out.append(step(model.params, state, batch))
    (s1, m1), (s2, m2) = out
    for a, b in zip(jax.tree.leaves(s1.adapter), jax.tree.leaves(s2.adapter)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for k in ("loss", "pg_loss", "kl", "completion_length", "advantage_mean", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(m1["kl"]) > 0 and float(m1["completion_length"]) == 3.0  # (2 + 6 + 1 + 3) / 4


def test_iteration_questions_cover_each_epoch():
    seen = [q for it in range(3) for q in iteration_questions(6, 4, 0, it)]  # 12 positions = 2 epochs
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
    assert iteration_questions(6, 4, 0, 1) == iteration_questions(6, 4, 0, 1) != iteration_questions(6, 4, 1, 1)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["rl.iterations=2"], "rl.reference"),
        (RL + ["tree.n=1"], "tree.n"),
        (RL + ["tree.m=1"], "tree.m"),
        (RL + ["tree.l=1"], "tree.l"),
        (RL + [f"rl.token_budget={ONE_TREE - 1}"], "rl.token_budget"),
        (RL + ["rl.questions_per_iteration=5"], "rl.questions_per_iteration"),  # 4 training questions
        (RL + ["rl.reference=sft"], "rl.sft_run"),
        (RL + ["sampling.temperature=0"], "sampling.temperature"),
    ],
)
def test_bad_rl_configs_are_refused_at_load_naming_the_field(tmp_path, overrides, key):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="parity")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}"), msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()
    assert load_run_config(path, RL + [f"rl.token_budget={ONE_TREE}"]).rl.token_budget == ONE_TREE


def test_the_rl_section_leaves_existing_config_hashes_alone():
    assert "rl" not in to_dict(RunConfig(), identity_only=True)
    rl = load_run_config(None, ["rl.iterations=2", "rl.reference=base"])
    assert rl.hash() != RunConfig().hash()
    assert load_run_config(None, ["rl.iterations=2", "rl.reference=base", "rl.micro_batch=2"]).hash() == rl.hash()


def test_errors_leave_an_existing_run_directory_as_it_was(full, tmp_path, model):
    cfg, _ = full
    run_dir = Path(cfg.run_dir)
    before = snapshot(run_dir)
    other = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, learning_rate=1e-3))  # another identity
    with pytest.raises(RunDirError, match="another config"):
        run_rl(other, model=model, task=ParityTask(), progress=False, evaluate=False)
    assert snapshot(run_dir) == before
    # a missing SFT run is refused before the run directory is stamped
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "notes.txt").write_text("keep me")
    bad = dataclasses.replace(
        cfg, run_dir=str(fresh), rl=dataclasses.replace(cfg.rl, reference="sft", sft_run=str(tmp_path / "nope"))
    )
    with pytest.raises(ConfigError, match="^rl.sft_run: "):
        run_rl(bad, model=model, task=ParityTask(), progress=False, evaluate=False)
    assert sorted(p.name for p in fresh.iterdir()) == [".lock.0", "notes.txt"]
    with pytest.raises(ConfigError, match="^rl.iterations: "):
        run_rl(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, iterations=0, reference="")))


def test_cli_rl(tmp_path, capsys):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="tests.parity_task:ParityTask")
    assert cli.main(["rl", str(path), "rl.iterations=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"malt-jax: error: {path}: rl.reference") and "\n" not in err
    assert not (tmp_path / "out").exists()
    args = [*RL, "rl.iterations=1", "rl.roles=[G]", "--no-progress", "--no-eval"]
    assert cli.main(["rl", str(path), *args]) == 0
    out = capsys.readouterr().out
    assert "G: iteration 0" in out and (tmp_path / "out" / "adapters" / "G.safetensors").exists()
