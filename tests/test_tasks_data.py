"""Loaders: GSM8K / MATH / CSQA files (good and malformed rows), TFDS round trip, real rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from malt_jax.tasks import DataError, get_task, train_eval_sets
from malt_jax.tasks.gsm8k import to_tfds

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Rows may be dicts (dumped) or raw strings (written verbatim, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GSM_GOOD = [
    {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
    {"question": "Big number?", "answer": "work\n#### 1,000"},
]


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", GSM_GOOD)
    write_jsonl(tmp_path / "test.jsonl", GSM_GOOD[:1])
    task = get_task("gsm8k", path=tmp_path)
    train = task.load("train")
    assert [e.answer for e in train] == ["7", "1000"]
    assert train[0].id == "train-1" and train[0].meta["solution"].endswith("#### 7")
    assert len(task.load("test")) == 1
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        task.load("validation")


@pytest.mark.parametrize(
    "bad,reason",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"answer": "#### 1"}), "missing field 'question'"),
        (json.dumps({"question": "q", "answer": "no marker"}), "####"),
        (json.dumps({"question": "q", "answer": "#### seven"}), "not a number"),
        (json.dumps(["a", "list"]), "JSON object"),
    ],
)
def test_gsm8k_malformed_names_file_and_line(tmp_path: Path, bad: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [GSM_GOOD[0], "", bad, GSM_GOOD[1]])
    with pytest.raises(DataError, match=reason) as info:
        get_task("gsm8k", path=path).load("train")
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: ")


def test_gsm8k_skip_mode_counts(tmp_path: Path) -> None:
    rows = [GSM_GOOD[0], "{bad", {"question": "q"}, {"question": "q", "answer": "x"}, GSM_GOOD[1]]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    task = get_task("gsm8k", path=path, on_error="skip")
    assert [e.answer for e in task.load("train")] == ["7", "1000"]
    assert task.skipped["train"] == 3
    assert all(str(path) in msg for msg in task.errors["train"])
    with pytest.raises(ValueError, match="on_error"):
        get_task("gsm8k", path=path, on_error="ignore")


def test_gsm8k_needs_path() -> None:
    with pytest.raises(ValueError, match="path"):
        get_task("gsm8k").load("train")


def test_gsm8k_tfds_round_trip_without_tensorflow(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src" / "test.jsonl", GSM_GOOD)
    version_dir = to_tfds(src, tmp_path / "tfds")
    assert (version_dir / "dataset_info.json").is_file()
    from_files = get_task("gsm8k", path=src).load("test")
    for path in (version_dir, tmp_path / "tfds"):  # version dir, or the data_dir above it
        task = get_task("gsm8k", path=path)
        assert task.load("test") == from_files
    with pytest.raises(FileNotFoundError, match="no split 'train'"):
        get_task("gsm8k", path=version_dir).load("train")
    write_jsonl(src, GSM_GOOD[1:])  # storing again replaces the rows
    again = get_task("gsm8k", path=to_tfds(src, tmp_path / "tfds")).load("test")
    assert [e.answer for e in again] == ["1000"]
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- MATH


def math_problem(solution: str, **extra: object) -> dict[str, object]:
    return {"problem": "Compute it.", "level": "Level 2", "type": "Algebra", "solution": solution, **extra}


def test_math_json_tree(tmp_path: Path) -> None:
    root = tmp_path / "MATH"
    (root / "train" / "algebra").mkdir(parents=True)
    (root / "test" / "geometry").mkdir(parents=True)
    (root / "train" / "algebra" / "1.json").write_text(json.dumps(math_problem(r"So $x=\boxed{\frac{1}{2}}$.")))
    (root / "train" / "algebra" / "2.json").write_text(
        json.dumps(math_problem(r"First \boxed{1}, finally \fbox{\{1, 2\}}"))
    )
    (root / "test" / "geometry" / "7.json").write_text(json.dumps(math_problem(r"\boxed{\dfrac{\sqrt{3}}{2}}")))
    task = get_task("math", path=root)
    train = task.load("train")
    assert [e.answer for e in train] == [r"\frac{1}{2}", r"\{1, 2\}"]
    assert train[0].id == "algebra/1" and train[0].meta["level"] == "Level 2"
    assert task.load("test")[0].answer == r"\dfrac{\sqrt{3}}{2}"
    assert task.grade(r"Final Answer: \frac{\sqrt{3}}{2}", task.load("test")[0].answer) == 1
    with pytest.raises(FileNotFoundError, match="validation"):
        task.load("validation")


def test_math_malformed_file_named(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "1.json").write_text(json.dumps(math_problem(r"\boxed{3}")))
    (root / "2.json").write_text(json.dumps(math_problem("no box here")))
    (root / "3.json").write_text('{"problem": "p",\n "solution": }')
    with pytest.raises(DataError, match="2.json: no 'answer'"):
        get_task("math", path=root).load("test")
    task = get_task("math", path=root, on_error="skip")
    assert [e.answer for e in task.load("test")] == ["3"]
    assert task.skipped["test"] == 2
    assert any("3.json:2: invalid JSON" in m for m in task.errors["test"])


def test_math500_jsonl(tmp_path: Path) -> None:
    rows = [
        {
            "problem": "p1",
            "answer": r"\left( 3, \frac{\pi}{2} \right)",
            "solution": "...",
            "subject": "Precalculus",
            "level": 2,
            "unique_id": "test/precalculus/807.json",
        },
        {"problem": "p2", "solution": "no answer field"},
    ]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError, match=r"test.jsonl:2"):
        get_task("math", path=path).load("test")
    task = get_task("math", path=tmp_path, on_error="skip")
    (ex,) = task.load("test")
    assert ex.id == "test/precalculus/807.json" and ex.meta["subject"] == "Precalculus"
    assert task.grade(r"Final Answer: (3, \pi/2)", ex.answer) == 1


# ----------------------------------------------------------------------------- CSQA

CSQA_ORIGINAL = {
    "answerKey": "B",
    "id": "q1",
    "question": {
        "question_concept": "books",
        "stem": "Where do you borrow books?",
        "choices": [
            {"label": label, "text": text} for label, text in zip("ABCDE", ["bank", "library", "mall", "zoo", "sea"])
        ],
    },
}
CSQA_HF = {
    "id": "q2",
    "question": "What do people aim to do at work?",
    "question_concept": "people",
    "choices": {"label": list("ABCDE"), "text": ["complete job", "learn", "kill", "hats", "talk"]},
    "answerKey": "A",
}


def test_csqa_both_layouts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train_rand_split.jsonl", [CSQA_ORIGINAL])
    write_jsonl(tmp_path / "dev_rand_split.jsonl", [CSQA_HF])
    task = get_task("csqa", path=tmp_path)
    (orig,) = task.load("train")
    assert orig.answer == "B" and orig.id == "q1"
    assert orig.question.splitlines() == [
        "Where do you borrow books?",
        "A) bank",
        "B) library",
        "C) mall",
        "D) zoo",
        "E) sea",
    ]
    assert orig.meta["choices"]["B"] == "library" and orig.meta["concept"] == "books"
    (hf,) = task.load("validation")  # "dev" file serves the validation split
    assert hf.answer == "A" and hf.meta["choices"]["A"] == "complete job"
    assert task.grade_example("Final Answer: library", orig) == 1
    assert task.grade("Final Answer: (B)", "B") == 1


@pytest.mark.parametrize(
    "bad,reason",
    [
        ({**CSQA_HF, "answerKey": "F"}, "answerKey 'F'"),
        ({k: v for k, v in CSQA_HF.items() if k != "answerKey"}, "missing field 'answerKey'"),
        ({**CSQA_HF, "choices": {"label": ["A"], "text": []}}, "differ in length"),
        ({**CSQA_ORIGINAL, "question": {"stem": "s"}}, "missing field 'choices'"),
    ],
)
def test_csqa_malformed(tmp_path: Path, bad: dict[str, object], reason: str) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [CSQA_HF, bad])
    with pytest.raises(DataError, match=reason) as info:
        get_task("csqa", path=path).load("validation")
    assert info.value.path == str(path) and info.value.line == 2
    task = get_task("csqa", path=path, on_error="skip")
    assert len(task.load("validation")) == 1 and task.skipped["validation"] == 1


# ----------------------------------------------------------------------------- real rows

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


@needs_shared
def test_real_gsm8k_rows() -> None:
    task = get_task("gsm8k", path=SHARED_DATA / "gsm8k")
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert task.skipped == {"train": 0, "test": 0}
    assert test[0].answer == "18" and "Janet" in test[0].question
    assert all(e.answer.lstrip("-").replace(".", "").isdigit() for e in train + test)
    # the reference solutions themselves grade as correct
    assert all(task.grade(e.meta["solution"], e.answer) == 1 for e in test)


@needs_shared
def test_real_csqa_rows() -> None:
    task = get_task("csqa", path=SHARED_DATA / "csqa")
    rows = task.load("validation")
    assert len(rows) == 1221 and task.skipped["validation"] == 0
    assert {e.answer for e in rows} == set("ABCDE")
    first = rows[0]
    assert first.answer == "A" and first.meta["choices"]["A"] == "bank"
    assert task.grade_example("Final Answer: bank", first) == 1
    assert sum(task.grade(f"Final Answer: {e.answer}", e.answer) for e in rows) == len(rows)


@needs_shared
def test_csqa_experiment_split_is_seeded_disjoint_and_600_held_out(tmp_path, monkeypatch):
    """experiments/smollm2_csqa.yaml splits the real validation rows into 64 training and 600
    held-out questions, disjoint also by question text, the same on every call, written to
    the run dir's splits.json."""
    import dataclasses
    import json

    from malt_jax.config import load_run_config
    from malt_jax.workflows import pipeline

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # task.path is relative to the project root
    cfg = load_run_config(root / "experiments" / "smollm2_csqa.yaml")
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    task = pipeline.make_task(cfg)
    run_dir = pipeline.prepare_run_dir(cfg)
    train, evals = pipeline.load_splits(cfg, task, run_dir)
    assert (len(train), len(evals)) == (64, 600)
    assert not {e.question for e in train} & {e.question for e in evals}
    saved = json.loads((run_dir / "splits.json").read_text())
    assert saved["train"] == [e.id for e in train] and saved["eval"] == [e.id for e in evals]
    again = train_eval_sets(task, 64, 600, cfg.task.seed, "validation", "validation")
    assert [e.id for e in again[1]] == saved["eval"]


# ----------------------------------------------------------------------------- unreadable text


def test_non_utf8_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    good = [(json.dumps(r) + "\n").encode() for r in GSM_GOOD]
    path.write_bytes(good[0] + b"\n" + b'{"question": "caf\xe9?", "answer": "#### 1"}\n' + good[1])
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 0xe9 at column 18") as info:
        get_task("gsm8k", path=path).load("train")
    assert info.value.line == 3 and str(info.value).startswith(f"{path}:3: ")
    task = get_task("gsm8k", path=path, on_error="skip")  # the other rows are kept
    assert [e.id for e in task.load("train")] == ["g-1", "g-4"]
    assert task.skipped["train"] == 1 and task.errors["train"][0].startswith(f"{path}:3: not UTF-8")


def test_non_utf8_json_file_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "1.json").write_text(json.dumps(math_problem(r"\boxed{3}")))
    (root / "2.json").write_bytes(b'{"problem": "p",\n "solution": "\\\\boxed{\xff}"}')
    with pytest.raises(DataError, match=r"2.json:2: not UTF-8 text: byte 0xff"):
        get_task("math", path=root).load("test")
    task = get_task("math", path=root, on_error="skip")
    assert [e.answer for e in task.load("test")] == ["3"] and task.skipped["test"] == 1


# ----------------------------------------------------------------------------- train/eval overlap


def test_overlap_is_checked_on_normalised_questions(tmp_path: Path) -> None:
    """Case and whitespace variants of a training question never reach the evaluation set."""
    from malt_jax.tasks.base import question_key, split_examples

    train = [{"question": f"Question {i}: what is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(6)]
    variants = [{"question": f"  QUESTION {i}:\twhat  is {i} +\n1? ", "answer": f"#### {i + 1}"} for i in range(6)] + [
        {"question": "A new question?", "answer": "#### 5"}
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", variants)
    task = get_task("gsm8k", path=tmp_path)
    tr, ev = train_eval_sets(task, 6, None, seed=0)
    assert len(tr) == 6 and [e.question for e in ev] == ["A new question?"]
    assert question_key("  Ünïcode\u00a0TEXT\n ") == question_key("ünïcode text")
    # within one pool: variants are duplicates that never straddle the split
    pool = task.load("train") + task.load("test")
    for seed in range(5):
        tr, ev = split_examples(pool, 5, None, seed)
        assert not {question_key(e.question) for e in tr} & {question_key(e.question) for e in ev}
