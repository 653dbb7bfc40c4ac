"""malt-jax rl's held-out accuracy against sampled tokens (``rl.eval_every``) on the tiny random
model and the parity task (3 iterations, trees 2x2x2, evaluation every 2 iterations on the 2
validation questions left by the 4 training and 6 evaluation questions): training unchanged by the
evaluation, the points and their token counts, the accuracies against the task's grade of the
written texts, exact resumption, the single-agent system, and settings refused naming the field."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from malt_jax.config import ConfigError, load_run_config, to_dict
from malt_jax.evaluation.stats import wilson_interval
from malt_jax.roles import ROLES
from malt_jax.runtime import tblog
from malt_jax.stages.eval import System, evaluate_system
from malt_jax.stages.rundir import load_adapters, read_jsonl, write_rows
from malt_jax.workflows.rl import initial_adapters, is_heldout_point, run_rl
from tests.fixtures import (
    RL,
    RL_SINGLE,
    rl_config,
    rl_metric_rows,
    snapshot,
    tiny_model,
    uninterrupted_rl,
    write_tiny_config,
)
from tests.parity_task import ParityTask

# checkpoints only at the end, so a stop after iteration 2 resumes from the start
BASE = [*RL, "rl.iterations=3", "rl.checkpoint_every=3", "rl.eval_questions=2"]
EVERY = "rl.eval_every=2"
POINTS = [0, 2, 3]  # before the first update, every 2 iterations, after the last
MALT = ("malt", "malt+MV@3")


def _rows(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "rl" / "heldout.jsonl")


def _final(run_dir: str | Path) -> dict:
    final, _ = load_adapters(Path(run_dir))
    assert final is not None
    return final


def _assert_same_adapters(a: dict, b: dict) -> None:
    for r in ROLES:
        for x, y in zip(jax.tree.leaves(a[r]), jax.tree.leaves(b[r]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, model):
    """The 3-iteration run without held-out evaluation."""
    return uninterrupted_rl(rl_config(tmp_path_factory.mktemp("plain"), BASE), model)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, model):
    """The same run evaluated on the validation questions every 2 iterations."""
    return uninterrupted_rl(rl_config(tmp_path_factory.mktemp("heldout"), BASE, extra=[EVERY]), model)


def test_heldout_points():
    assert [i for i in range(8) if is_heldout_point(i, 3, last=i == 7)] == [0, 3, 6, 7]
    assert [i for i in range(3) if is_heldout_point(i, 1, last=False)] == [0, 1, 2]
    assert not any(is_heldout_point(i, 0, last=True) for i in range(4))  # 0 = off


def test_the_evaluation_leaves_training_unchanged(plain, heldout):
    (cfg0, s0), (cfg1, s1) = plain, heldout
    same = lambda c: dataclasses.replace(c, run_dir=".").hash()  # noqa: E731
    assert same(cfg0) == same(cfg1)  # rl.eval_every is not part of the run's identity
    final = _final(cfg1.run_dir)
    _assert_same_adapters(_final(cfg0.run_dir), final)
    assert np.abs(np.asarray(final["G"]["layers"]["wq"]["b"])).max() > 0  # they were trained
    strip = lambda rows: [{k: v for k, v in r.items() if k != "iteration_s"} for r in rows]  # noqa: E731
    assert strip(rl_metric_rows(Path(cfg0.run_dir))) == strip(rl_metric_rows(Path(cfg1.run_dir)))
    assert s0["num_tokens"] == s1["num_tokens"] and s0["heldout"] == []
    assert not (Path(cfg0.run_dir) / "rl" / "heldout.jsonl").exists()
    assert not (Path(cfg0.run_dir) / "validation.json").exists()


def test_rows_at_the_start_every_k_iterations_and_the_end_with_the_metrics_tokens(heldout):
    cfg, summary = heldout
    run_dir = Path(cfg.run_dir)
    rows = _rows(run_dir)
    assert [(r["iteration"], r["system"]) for r in rows] == [(i, s) for i in POINTS for s in MALT]
    # the tokens sampled once i iterations are done: the metrics rows' running count
    tokens = {0: 0} | {r["iteration"] + 1: r["num_tokens"] for r in rl_metric_rows(run_dir)}
    assert [r["num_tokens"] for r in rows] == [tokens[r["iteration"]] for r in rows]
    assert rows[-1]["num_tokens"] == summary["num_tokens"] > rows[2]["num_tokens"] > 0
    for r in rows:
        assert r["n"] == 2 and 0 <= r["correct"] <= 2 and r["accuracy"] == r["correct"] / 2
        assert r["ci95"] == pytest.approx(list(wilson_interval(r["correct"], r["n"])), abs=1e-4)
    assert summary["heldout"] == rows
    assert sorted(p.name for p in (run_dir / "rl" / "heldout").iterdir()) == sorted(map(str, POINTS))
    report = (run_dir / "rl" / "report.md").read_text()
    assert "## Held-out accuracy against sampled tokens" in report
    for i in POINTS:
        r = next(r for r in rows if r["iteration"] == i and r["system"] == "malt+MV@3")
        assert f"| {i} | {r['num_tokens']:,} |" in report and f"({r['correct']} / 2) |\n" in report
    if tblog.available():
        assert list((run_dir / "tensorboard" / "rl_heldout").glob("events.out.tfevents.*"))


def test_validation_questions_are_neither_training_nor_evaluation_questions(heldout):
    run_dir = Path(heldout[0].run_dir)
    task = ParityTask()
    text = {e.id: e.question for s in ("train", "test", "validation") for e in task.load(s)}
    val = json.loads((run_dir / "validation.json").read_text())["validation"]
    splits = json.loads((run_dir / "splits.json").read_text())
    assert len(val) == 2 and all(i.startswith("validation-") for i in val)
    assert not {text[i] for i in val} & {text[i] for i in splits["train"] + splits["eval"]}


def test_accuracy_is_the_task_grade_of_the_written_texts(heldout):
    cfg, _ = heldout
    run_dir = Path(cfg.run_dir)
    task = ParityTask()
    examples = {e.id: e for e in task.load("validation")}
    rows = _rows(run_dir)
    for i in POINTS:
        written = read_jsonl(run_dir / "rl" / "heldout" / str(i) / "malt.jsonl")
        assert len(written) == 2 and all(len(w["texts"]["R"]) == 3 for w in written)
        first = sum(task.grade(w["texts"]["R"][0], examples[w["id"]].answer) for w in written)
        votes = sum(
            Counter(task.extract(t) for t in w["texts"]["R"]).most_common(1)[0][0] == examples[w["id"]].answer
            for w in written
        )
        got = {r["system"]: r["correct"] for r in rows if r["iteration"] == i}
        assert got == {"malt": first, "malt+MV@3": votes}, i


def test_a_point_evaluates_the_adapters_of_its_iteration_with_the_eval_seed(heldout, model, tmp_path):
    """The start and the final adapters evaluated afresh (eval.seed, eval.votes) give the texts
    written at points 0 and 3."""
    cfg, _ = heldout
    run_dir = Path(cfg.run_dir)
    ids = json.loads((run_dir / "validation.json").read_text())["validation"]
    val = sorted((e for e in ParityTask().load("validation") if e.id in ids), key=lambda e: ids.index(e.id))
    system = System("malt", 3, cfg.eval.votes, False, True)
    for i, adapters in ((0, initial_adapters(cfg)[0]), (3, _final(run_dir))):
        out = tmp_path / f"{i}.jsonl"
        fresh = evaluate_system(system, cfg, model, ParityTask(), val, adapters, out, progress=False)
        written = read_jsonl(run_dir / "rl" / "heldout" / str(i) / "malt.jsonl")
        assert {w["id"]: w["texts"] for w in written} == {f["id"]: f["texts"] for f in fresh}, i


def test_resume_keeps_the_rows_up_to_the_checkpoint_and_redoes_the_others(heldout, tmp_path, model):
    cfg = rl_config(tmp_path, BASE, extra=[EVERY])
    run_dir = Path(cfg.run_dir)
    stopped = run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False, stop_after=2)
    assert stopped["stopped_at"] == 2
    path = run_dir / "rl" / "heldout.jsonl"
    assert [r["iteration"] for r in read_jsonl(path)] == [0, 0, 2, 2]
    # marked: a kept row keeps its mark (not evaluated again), a dropped one is written anew
    write_rows(path, [{**r, "mark": True} for r in read_jsonl(path)])
    run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)
    rows = read_jsonl(path)
    assert [r.get("mark", False) for r in rows] == [True, True, False, False, False, False]
    assert [{k: v for k, v in r.items() if k != "mark"} for r in rows] == _rows(heldout[0].run_dir)
    _assert_same_adapters(_final(run_dir), _final(heldout[0].run_dir))


def test_another_number_of_validation_questions_is_refused_on_a_rerun(heldout, model):
    cfg, _ = heldout
    run_dir = Path(cfg.run_dir)
    before = snapshot(run_dir)
    other = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, eval_questions=1))
    with pytest.raises(ConfigError, match=r"^rl.eval_questions: .* on 2 validation questions") as info:
        run_rl(other, model=model, task=ParityTask(), progress=False, evaluate=False)
    assert "\n" not in str(info.value)
    assert snapshot(run_dir) == before


def test_single_agent_runs_record_the_single_trained_system(tmp_path, model):
    extra = ["rl.iterations=1", "rl.eval_every=1", "rl.eval_questions=2"]
    cfg, summary = uninterrupted_rl(rl_config(tmp_path, RL_SINGLE, extra=extra), model)
    run_dir = Path(cfg.run_dir)
    rows = _rows(run_dir)
    names = ("single-trained", "single-trained+MV@3")
    assert [(r["iteration"], r["system"]) for r in rows] == [(i, n) for i in (0, 1) for n in names]
    assert [r["num_tokens"] for r in rows] == [0, 0, summary["num_tokens"], summary["num_tokens"]]
    written = read_jsonl(run_dir / "rl" / "heldout" / "1" / "single-trained.jsonl")
    assert len(written) == 2 and all(set(w["texts"]) == {"G"} for w in written)


@pytest.mark.parametrize(
    "override,key", [("rl.eval_every=-1", "rl.eval_every"), ("rl.eval_questions=0", "rl.eval_questions")]
)
def test_bad_settings_are_refused_at_load_naming_the_field(tmp_path, override, key):
    path = write_tiny_config(tmp_path / "c.yaml", tmp_path / "out", task="parity")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, [*BASE, override])
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}") and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_too_many_validation_questions_are_refused_before_any_write(tmp_path, model):
    cfg = rl_config(tmp_path, BASE, extra=[EVERY, "rl.eval_questions=3"])  # the parity task leaves 2
    with pytest.raises(ConfigError) as info:
        run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)
    msg = str(info.value)
    assert msg.startswith("rl.eval_questions: 3 asked") and "only 2 question(s)" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == [".lock.0"]


def test_the_settings_leave_the_run_identity_alone():
    base = load_run_config(None, BASE)
    assert load_run_config(None, [*BASE, EVERY, "rl.eval_questions=7"]).hash() == base.hash()
    assert not {"eval_every", "eval_questions"} & set(to_dict(base, identity_only=True)["rl"])
