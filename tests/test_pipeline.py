"""End to end: every stage on a tiny random model, artifacts checked for consistency, resume."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from malt_jax.roles import ROLE_NAMES, ROLES
from malt_jax.stages import rundir
from malt_jax.stages.credit import build_datasets
from malt_jax.stages.eval import critique_verdict, default_systems, evaluate_system
from malt_jax.stages.train import heldout_questions, run_train
from malt_jax.tasks import Example
from malt_jax.workflows import pipeline
from tests.fixtures import finished_tiny_run, hand_trees
from tests.parity_task import ParityTask


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return finished_tiny_run(tmp_path_factory.mktemp("run"))


def test_artifacts_and_consistency(tiny_run):
    cfg, model, summary = tiny_run
    out = Path(cfg.run_dir)
    trees = rundir.load_expansion(out)
    assert trees["rewards"].shape == (4, 2, 2, 2)
    assert 0 < trees["rewards"].mean() < 1
    credit = json.loads((out / "credit" / "summary.json").read_text())
    for role, name in ROLE_NAMES.items():
        n_sft = len((out / "credit" / f"{role}_sft.jsonl").read_text().splitlines())
        n_dpo = len((out / "credit" / f"{role}_dpo.jsonl").read_text().splitlines())
        assert credit[f"{name}/sft"] == n_sft
        assert credit[f"{name}/dpo_pairs"] == n_dpo
        assert (out / "adapters" / f"{role}.safetensors").exists()
    # leaf rewards in the tree files agree with the task's grading of the refiner texts
    row = json.loads((out / "expansion" / "batch_00000.jsonl").read_text().splitlines()[0])
    task = ParityTask()
    np.testing.assert_array_equal(
        np.vectorize(lambda t: task.grade(t, "even"))(np.array(row["R"], object)), np.array(row["rewards"])
    )
    # every system evaluated on the same 6 questions; the report's accuracies match the jsonl
    report = (out / "report.md").read_text()
    for run in ("single-greedy", "single", "chain", "malt"):
        rows = [json.loads(x) for x in (out / "eval" / f"{run}.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        systems = {run: np.mean([r["pass_correct"][0] for r in rows])}
        if run != "single-greedy":
            assert all(len(r["pass_answers"]) == 3 for r in rows)
            systems[run + "+MV@3"] = np.mean([r["vote_correct"] for r in rows])
        for name, acc in systems.items():
            assert f"| {name} | {acc:.4f}" in report or f"| {name} | {acc * 100:.1f}" in report, name
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "positive_rate.png").exists()
    assert len(summary["comparisons"]) == 10  # 2 MALT systems x 5 baselines
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["train"]) == 4 and len(splits["eval"]) == 6


def test_report_run_table_is_the_run_record(tiny_run):
    """report.md's "Run" table: one labelled row per RunRecord field the pipeline sets, none twice."""
    from malt_jax.evaluation.report import RunRecord

    cfg, _, _ = tiny_run
    lines = (Path(cfg.run_dir) / "report.md").read_text().split("## Run\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:] if line.startswith("|")]
    labels = [r[0] for r in rows]
    assert labels == [f.metadata["label"] for f in dataclasses.fields(RunRecord) if "label" in f.metadata]
    table = dict(rows)
    assert table["Questions"] == "6" and table["Training questions"] == "4" and table["Tree (n x m x l)"] == "2x2x2"
    assert table["Config hash"] == cfg.hash() and table["Framing"] == cfg.task.framing
    assert all(f"{stage}: " in table["Wall time"] for stage in ("load", "expand", "credit", "train", "eval"))


def test_rerun_resumes_without_recomputing(tiny_run):
    cfg, model, summary = tiny_run
    out = Path(cfg.run_dir)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".npz", ".safetensors")}
    again = pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    assert again["table"] == summary["table"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_other_config_in_same_run_dir_is_refused(tiny_run):
    cfg, model, _ = tiny_run
    other = dataclasses.replace(cfg, name="changed")
    with pytest.raises(ValueError, match="another config"):
        rundir.prepare_run_dir(other)


def test_single_scored_from_chain_equals_sampling_it(tiny_run, tmp_path):
    """The sampled single-model system is scored from the untrained chain's generator level;
    sampling it on its own gives the same texts, answers and votes."""
    cfg, model, _ = tiny_run
    out = Path(cfg.run_dir)
    derived = [json.loads(x) for x in (out / "eval" / "single.jsonl").read_text().splitlines()]
    task = ParityTask()
    _, evals = rundir.load_splits(cfg, task, out)
    single = next(s for s in default_systems(3) if s.name == "single")
    sampled = evaluate_system(single, cfg, model, task, evals, None, tmp_path / "single.jsonl", progress=False)
    assert [r["texts"]["G"] for r in sampled] == [r["texts"]["G"] for r in derived]
    assert sampled == derived
    chain = [json.loads(x) for x in (out / "eval" / "chain.jsonl").read_text().splitlines()]
    assert [r["texts"]["G"] for r in chain] == [r["texts"]["G"] for r in derived]


def test_role_ablations_use_trained_adapters_only_for_their_roles(tiny_run, tmp_path):
    """The paper's role ablations: each role with MALT's adapter samples exactly what MALT's own
    chain sampled at that level (same keys), and the ablations are compared with MALT only."""
    import jax

    from malt_jax.stages.eval import run_eval

    cfg, model, _ = tiny_run
    out = Path(cfg.run_dir)
    task = ParityTask()
    _, evals = rundir.load_splits(cfg, task, out)
    adapters, sft_adapters = rundir.load_adapters(out)
    # a verifier adapter far from zero, so that its texts surely differ from the base V's
    adapters = {**adapters, "V": jax.tree.map(lambda x: x * 0 + 0.5, adapters["V"])}
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, ablations=True))
    names = [s.name for s in default_systems(3, ablations=True)]
    ablations = ("malt-G", "malt-GV", "malt-GR", "malt-GR0")
    assert tuple(names[-4:]) == ablations
    ev = run_eval(cfg, model, task, evals, out, adapters, progress=False, sft_adapters=sft_adapters, out=tmp_path)
    rows = {n: [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in names}
    col = lambda name, role: [r["texts"][role] for r in rows[name]]  # noqa: E731
    for ablation in ablations:
        assert col(ablation, "G") == col("malt", "G")
    assert col("malt-GV", "V") == col("malt", "V")
    assert col("malt-G", "V") == col("malt-GR", "V")  # both the base V, after the same G texts
    assert col("malt-G", "V") != col("malt", "V")  # the trained V adapter changes what V says
    assert col("malt-GR0", "V") == [["", "", ""]] * len(evals)  # G -> (no critique) -> R
    assert "malt-GR0" not in ev["verifier"] and ev["skills"]["malt-GR0"]["verifier"]["n"] == 0
    pairs = {(c["target"], c["baseline"]) for c in ev["comparisons"]}
    assert not any(t.startswith(ablations) for t, _ in pairs)
    assert {("malt+MV@3", f"{a}+MV@3") for a in ablations} <= pairs
    assert {("malt", a) for a in ablations} <= pairs


def test_speed_only_fields_do_not_change_run_identity(tiny_run):
    """A run dir accepts the same config with another decode compaction setting (same samples),
    and refuses one whose sampling changes."""
    cfg, _, _ = tiny_run
    faster = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, compact_levels=0))
    assert faster.hash() == cfg.hash()
    assert rundir.prepare_run_dir(faster) == Path(cfg.run_dir)
    hotter = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, temperature=0.5))
    with pytest.raises(ValueError, match="another config"):
        rundir.prepare_run_dir(hotter)


def test_write_atomic_text_and_binary_leave_no_temporaries(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    rundir.write_atomic(target, '{"x": 1}')
    assert json.loads(target.read_text()) == {"x": 1}
    arrays = {"t": np.arange(6).reshape(2, 3)}
    rundir.write_atomic(tmp_path / "b.npz", lambda f: np.savez(f, **arrays))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["t"], arrays["t"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz"]
    with pytest.raises(ZeroDivisionError):  # a failed write keeps the old file, and no temporary
        rundir.write_atomic(target, lambda f: 1 / 0)
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz"]


def test_build_datasets_drops_identical_pairs_and_balances_the_verifier():
    rewards = np.zeros((1, 2, 2, 2), np.float32)
    rewards[0, 0, 0] = [1, 0]  # V (0,0,0): value 0.5 -> negative; R pair 30 vs 31
    rewards[0, 0, 1] = [1, 1]  # V (0,0,1) positive (under a right G answer)
    rewards[0, 1, 0] = [1, 1]  # V (0,1,0) positive (under a wrong G answer)
    rewards[0, 1, 1] = [1, 1]  # V (0,1,1) positive (under a wrong G answer)
    trees = hand_trees(rewards, np.array([[True, False]]))
    seps = (([1],), ([1], [2]))
    data, summary = build_datasets(trees, seps, 99, 0.5, None, 0, verifier_balance=True)
    assert summary["refiner/dpo_identical"] == 0 and len(data["R"]["dpo"]) == 1
    v = data["V"]["sft"]
    assert [r["coord"] for r in v] == [[0, 0, 1], [0, 1, 0], [0, 1, 1]]
    # 1 example under the right answer, 2 under the wrong one: equal total weight, mean 1
    assert [r["weight"] for r in v] == pytest.approx([1.5, 0.75, 0.75])
    assert summary["verifier/sft_under_right_answers"] == 1 and summary["verifier/sft_under_wrong_answers"] == 2
    unbalanced, _ = build_datasets(trees, seps, 99, 0.5, None, 0, verifier_balance=False)
    assert all("weight" not in r for r in unbalanced["V"]["sft"])
    # the same R tokens for chosen and rejected: the pair is dropped and counted
    trees["R_tokens"][0, 0, 0, 1] = trees["R_tokens"][0, 0, 0, 0]
    same, summary = build_datasets(trees, seps, 99, 0.5, None, 0)
    assert same["R"]["dpo"] == [] and summary["refiner/dpo_identical"] == 1 and summary["refiner/dpo_pairs"] == 0
    # examples are weighted in training through data.pack_sft's loss mask
    from malt_jax.training import data as D

    batch = D.pack_sft([D.SFTExample(r["prompt"], r["completion"], r["weight"]) for r in v], 32)
    assert batch["loss_mask"].sum(1).tolist() == pytest.approx([1.5 * 2, 0.75 * 2, 0.75 * 2])


def test_critique_verdict_reads_labels_and_restated_answers():
    from malt_jax.tasks import get_task

    task = get_task("synthetic", style="inverse")
    ex = Example(id="q", question="What is 21 ÷ 7?", answer="3")
    g = "21 ÷ 7 = 3\nFinal Answer: 3"
    assert critique_verdict(task, "The correct answer is 3.", g, ex) is True
    assert critique_verdict(task, "The correct answer is 3.0", g, ex) is True  # same canonical key
    assert critique_verdict(task, "The correct answer is 4. 4 x 7 = 28", "21 ÷ 7 = 4", ex) is True
    assert critique_verdict(task, "The correct answer is 7.", g, ex) is False
    assert critique_verdict(task, "Verdict: incorrect. The correct answer is 3.", g, ex) is False
    assert critique_verdict(task, "The correct answer is not given; it is wrong", g, ex) is False
    assert critique_verdict(task, "The correct answer is unclear.", g, ex) is None


def test_run_writes_its_json_summary(tiny_run):
    cfg, _, summary = tiny_run
    out = Path(cfg.run_dir)
    s = json.loads((out / "summary.json").read_text())
    for key in ("experiment", "command", "n_train", "n_eval", "systems", "comparisons", "training", "wall_time_s"):
        assert key in s
    assert s["n_train"] == 4 and s["n_eval"] == 6
    rows = [json.loads(x) for x in (out / "eval" / "malt.jsonl").read_text().splitlines()]
    assert s["systems"]["malt"]["correct"] == sum(r["pass_correct"][0] for r in rows)
    assert s["systems"]["malt+MV@3"]["correct"] == sum(r["vote_correct"] for r in rows)
    assert [c for c in s["comparisons"] if c["primary"]][0]["b"] == "single+MV@3"
    assert set(s["training"]) == {"G", "V", "R"} and set(s["verifier"]) == {"chain", "malt"}
    # peak resident memory per stage (Linux): the model is loaded, so every stage holds its weights
    if sys.platform.startswith("linux"):
        peaks = json.loads((out / "peak_rss_gb.json").read_text())
        assert set(peaks) == {"load", "expand", "credit", "train", "eval"} and s["peak_rss_gb"] == peaks
        assert all(0.05 < v < 24 for v in peaks.values())


def test_heldout_questions_and_training_counts(tiny_run):
    held = heldout_questions(100, 0.1, seed=0)
    assert len(held) == 10 and held == heldout_questions(100, 0.1, seed=0)
    assert held != heldout_questions(100, 0.1, seed=1) and held <= set(range(100))
    assert heldout_questions(1, 0.5, 0) == set() and heldout_questions(5, 0.0, 0) == set()
    assert len(heldout_questions(4, 0.1, 0)) == 1  # at least one question when the fraction is > 0
    cfg, _, _ = tiny_run
    out = Path(cfg.run_dir)
    counts = rundir.training_counts(out)
    for role in ROLES:
        c = counts[role]
        n_sft = len((out / "credit" / f"{role}_sft.jsonl").read_text().splitlines())
        assert c["heldout_questions"] == 1 and c["sft"]["examples"] == n_sft
        assert c["sft"]["heldout"] + c["sft"]["train"] == n_sft and c["sft"]["train_after_cap"] == c["sft"]["train"]
        held_q = {json.loads(x)["coord"][0] for x in (out / "credit" / f"{role}_sft.jsonl").read_text().splitlines()}
        assert c["sft"]["heldout"] == 0 or len(held_q) > 1  # held out by question, never all of them


def test_caps_are_applied_after_the_split_and_reported(tiny_run, tmp_path):
    import shutil

    cfg, model, _ = tiny_run
    src = Path(cfg.run_dir)
    run_dir = tmp_path / "capped"
    run_dir.mkdir()
    shutil.copytree(src / "credit", run_dir / "credit")
    capped = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_sft_examples=2, max_dpo_pairs=1, sft_epochs=1, dpo_epochs=1)
    )
    run_train(capped, model, run_dir, progress=False, roles=("R",))
    c = rundir.training_counts(run_dir)["R"]
    assert c["sft"]["train"] > 2 and c["sft"]["train_after_cap"] == 2
    assert c["dpo"]["train_after_cap"] == min(1, c["dpo"]["train"])


def _tb_scalars(logdir):
    """{tag: [(step, value)]} of the TensorBoard event files in ``logdir`` (TFRecord framing read
    here, events decoded with the protobuf definitions TensorBoard uses)."""
    import struct

    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    out = {}
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_mirrors_the_jsonl_under_trl_names(tiny_run):
    pytest.importorskip("tensorboardX")
    cfg, _, summary = tiny_run
    out = Path(cfg.run_dir)
    assert summary["tensorboard"] == f"tensorboard --logdir {out / 'tensorboard'}"
    history = [json.loads(x) for x in (out / "adapters" / "R_history.jsonl").read_text().splitlines()]
    epochs = [json.loads(x) for x in (out / "adapters" / "R_epochs.jsonl").read_text().splitlines()]
    for stage in ("sft", "dpo"):
        tb = _tb_scalars(out / "tensorboard" / "R" / stage)
        rows = [h for h in history if h["stage"] == stage]
        assert [s for s, _ in tb["train/loss"]] == [h["step"] for h in rows]
        assert [v for _, v in tb["train/loss"]] == pytest.approx([h["loss"] for h in rows], rel=1e-6)
        assert "train/learning_rate" in tb and "train/grad_norm" in tb
        held = [e for e in epochs if e["stage"] == stage and e.get("heldout/loss") is not None]
        assert [v for _, v in tb.get("eval/loss", [])] == pytest.approx([e["heldout/loss"] for e in held], rel=1e-6)
        if stage == "dpo":
            assert [v for _, v in tb["train/rewards/accuracies"]] == pytest.approx(
                [h["rewards/accuracies"] for h in rows], rel=1e-6
            )
            assert "train/rewards/margins" in tb and "train/logps/chosen" in tb
        else:
            assert "train/mean_token_accuracy" in tb
    ev = _tb_scalars(out / "tensorboard" / "eval")
    record = json.loads((out / "summary.json").read_text())
    assert ev["eval/accuracy/malt_MV_3"][-1][1] == pytest.approx(record["systems"]["malt+MV@3"]["accuracy"])
    assert "eval/verifier/malt/balanced_accuracy" in ev
