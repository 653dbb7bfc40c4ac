"""The run directory does not trust its files blindly: one tampered file per test, each refused
with one line naming the file (and nothing already computed removed), or shown to be safe."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from malt_jax.config import ConfigError, load_run_config
from malt_jax.stages import rundir
from malt_jax.stages.rundir import RunDirError
from malt_jax.workflows import pipeline
from malt_jax.workflows.ask import ask_run
from malt_jax.workflows.export import export_run
from tests.fixtures import finished_tiny_run
from tests.parity_task import ParityTask


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished tiny run (every stage), copied by each test before it tampers with it."""
    cfg, model, _ = finished_tiny_run(tmp_path_factory.mktemp("trust"))
    return cfg, model


@pytest.fixture
def copy(made, tmp_path):
    """The finished run copied to another place (``run_dir`` differs from its config.yaml's)."""
    cfg, model = made
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / "run")), model, tmp_path / "run"


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _refused(match: str, path: Path) -> Iterator[pytest.ExceptionInfo]:
    """The block raises a one-line RunDirError that matches ``match`` and names ``path``."""
    with pytest.raises(RunDirError, match=match) as e:
        yield e
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


def _edit_config(run_dir: Path, edit) -> None:
    p = run_dir / "config.yaml"
    data = yaml.safe_load(p.read_text())
    edit(data)
    p.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_moved_or_copied_run_resumes_without_recomputing(copy):
    cfg, model, run_dir = copy
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] != cfg.run_dir
    done = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.suffix in (".npz", ".safetensors", ".jsonl")}
    pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    assert {p: p.stat().st_mtime_ns for p in done} == done
    # the identity is otherwise compared as before
    with pytest.raises(RunDirError, match="another config"):
        rundir.prepare_run_dir(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, votes=5)))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["eval"].update(temperature=0.1),  # a value of the run's identity
        lambda d: d["eval"].update(votes=5),
        lambda d: d.update(config_hash="0123456789ab"),  # the hash stamp itself
    ],
    ids=["eval.temperature", "eval.votes", "config_hash"],
)
def test_hand_edited_config_yaml_is_refused_where_it_is_read(copy, edit):
    cfg, model, run_dir = copy
    _edit_config(run_dir, edit)
    before = _files(run_dir)
    with _refused("edited after the run was made", run_dir / "config.yaml"):
        pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    with pytest.raises(RunDirError, match="edited after the run was made"):
        rundir.read_run_config(run_dir)
    # ask and export read the run's config before loading anything
    with pytest.raises(ConfigError, match="config.yaml: edited after the run was made"):
        ask_run(run_dir, "1 0 1")
    with pytest.raises(ConfigError, match="config.yaml: edited after the run was made"):
        export_run(run_dir, run_dir.parent / "exported", "peft")
    assert not (run_dir.parent / "exported").exists()
    assert _files(run_dir) == before  # nothing lost, nothing rewritten


def test_config_yaml_without_its_hash_is_refused(copy):
    cfg, _, run_dir = copy
    _edit_config(run_dir, lambda d: d.pop("config_hash"))
    with _refused("no config_hash recorded", run_dir / "config.yaml"):
        rundir.prepare_run_dir(cfg)


def test_speed_only_edits_to_config_yaml_are_accepted(copy):
    """Fields outside the identity do not change results (``identity: False``): not an edit of the run."""
    cfg, _, run_dir = copy
    _edit_config(run_dir, lambda d: d["sampling"].update(compact_levels=0))
    assert rundir.read_run_config(run_dir).sampling.compact_levels == 0
    assert rundir.prepare_run_dir(cfg) == run_dir


def test_deleted_config_yaml_does_not_let_outputs_be_adopted_by_a_new_config(copy):
    cfg, model, run_dir = copy
    (run_dir / "config.yaml").unlink()
    before = _files(run_dir)
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, temperature=0.1))
    with _refused("holds run outputs .*no config.yaml", run_dir) as e:
        pipeline.run(other, model=model, task=ParityTask(), progress=False)
    for name in ("adapters", "credit", "eval", "expansion", "splits.json"):
        assert name in str(e.value)
    assert "restore its config.yaml" in str(e.value)
    assert _files(run_dir) == before and not (run_dir / "config.yaml").exists()


def test_stamp_is_written_only_after_task_and_data_load(made, tmp_path):
    """A run failing on a bad task does not record its config: the corrected config is accepted."""
    cfg, model = made
    run_dir = tmp_path / "run"
    bad = dataclasses.replace(
        cfg, run_dir=str(run_dir), task=dataclasses.replace(cfg.task, name="tests.parity_task:NoSuchTask")
    )
    with pytest.raises(ConfigError):
        pipeline.run(bad, model=model, progress=False)
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "splits.json").exists()
    good = dataclasses.replace(cfg, run_dir=str(run_dir))
    pipeline.run(good, stages=(), model=model, task=ParityTask(), progress=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["config_hash"] == good.hash()
    assert (run_dir / "splits.json").exists()


def test_edited_splits_json_is_refused(copy):
    cfg, model, run_dir = copy
    p = run_dir / "splits.json"
    s = json.loads(p.read_text())
    s["train"][0], s["train"][1] = s["train"][1], s["train"][0]
    p.write_text(json.dumps(s))
    with _refused("'train' questions are not those", p):
        pipeline.run(cfg, model=model, task=ParityTask(), progress=False)
    p.write_text("{not json")
    with _refused("not valid JSON", p):
        rundir.load_splits(cfg, ParityTask(), run_dir)


def _two_batches(run_dir: Path) -> list[Path]:
    """The expansion as two batches of 2 questions (the run wrote one: batches are rounded to the
    device count); still a valid expansion."""
    d = run_dir / "expansion"
    whole = rundir.load_expansion(run_dir)
    for f in d.glob("batch_*.npz"):
        f.unlink()
    files = [d / "batch_00000.npz", d / "batch_00001.npz"]
    for f, rows in zip(files, (slice(0, 2), slice(2, None))):
        np.savez(f, **{k: v[rows] for k, v in whole.items()})
    assert rundir.load_expansion(run_dir)["index"].tolist() == [0, 1, 2, 3]
    return files


def test_truncated_expansion_batch_is_refused(copy):
    _, _, run_dir = copy
    f = _two_batches(run_dir)[1]
    f.write_bytes(f.read_bytes()[:100])
    with _refused("unreadable expansion batch", f):
        rundir.load_expansion(run_dir)


def test_expansion_batch_of_another_shape_is_refused(copy):
    _, _, run_dir = copy
    f = _two_batches(run_dir)[1]
    arrays = dict(np.load(f))
    arrays["rewards"] = np.zeros((len(arrays["index"]), 3, 2, 2), np.float32)  # a tree of n=3
    np.savez(f, **arrays)
    with _refused("come from different runs", f):
        rundir.load_expansion(run_dir)


def test_removed_expansion_batch_is_refused(copy):
    _, _, run_dir = copy
    _two_batches(run_dir)[0].unlink()  # questions 2 and 3 left, read as if they were 0 and 1
    with _refused(r"not 0..N-1", run_dir / "expansion"):
        rundir.load_expansion(run_dir)


def test_cut_or_edited_credit_sets_are_refused(copy):
    _, _, run_dir = copy
    p = run_dir / "credit" / "G_sft.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    assert len(lines) > 1
    p.write_text("".join(lines[:-1]))  # one row less than credit/summary.json counts
    with _refused(rf"{len(lines) - 1} rows, .*summary.json counts {len(lines)}", p):
        rundir.load_datasets(run_dir, "G")
    p.write_text("".join(lines[:-1]) + "{cut\n")
    with _refused(rf"G_sft.jsonl:{len(lines)}: not valid JSON", p):
        rundir.load_datasets(run_dir, "G")
    p.write_text("".join(lines[:-1]) + json.dumps({"prompt": [1]}) + "\n")
    with _refused("a row lacks 'completion'", p):
        rundir.load_datasets(run_dir, "G")


def test_broken_training_json_and_adapter_are_refused(copy):
    _, _, run_dir = copy
    t = run_dir / "adapters" / "training.json"
    t.write_text('{"G": ')
    with _refused("not valid JSON", t):
        rundir.training_counts(run_dir)
    a = run_dir / "adapters" / "V.safetensors"
    a.write_bytes(a.read_bytes()[:50])
    with _refused("unreadable adapter", a):
        rundir.load_adapters(run_dir)


def test_eval_rows_broken_are_refused_and_incomplete_are_evaluated_again(copy):
    _, _, run_dir = copy
    p = run_dir / "eval" / "malt.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    assert rundir.read_rows(p, len(lines)) is not None
    p.write_text("".join(lines[:-1]))  # incomplete: not used, the system is evaluated again
    assert rundir.read_rows(p, len(lines)) is None
    p.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2] + "\n")
    with _refused("not valid JSON", p):
        rundir.read_rows(p, len(lines))


def test_broken_timings_json_is_named(copy):
    cfg, model, run_dir = copy
    (run_dir / "timings.json").write_text("[1, 2")
    with _refused("not valid JSON", run_dir / "timings.json"):
        pipeline.run(cfg, model=model, task=ParityTask(), progress=False)


def test_every_experiment_config_verifies_after_its_stamp(tmp_path):
    """config.yaml round trip: the stamp of every shipped experiment verifies against its hash."""
    root = Path(__file__).resolve().parent.parent
    for i, path in enumerate(sorted((root / "experiments").glob("*.yaml"))):
        cfg = load_run_config(path, [f"run_dir={tmp_path / str(i)}"])
        rundir.prepare_run_dir(cfg)
        assert rundir.read_run_config(cfg.run_dir).hash() == cfg.hash(), path.name
