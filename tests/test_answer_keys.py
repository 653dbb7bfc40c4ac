"""Canonical answer keys for majority voting, explicit final answers and strict leaf rewards."""

import json
import re
import types

import numpy as np
import pytest

from malt_jax.evaluation.stats import majority_vote
from malt_jax.stages.credit import run_credit
from malt_jax.stages.eval import System, _score
from malt_jax.stages.expand import grade_leaves
from malt_jax.tasks import Example, LoadResult, Task, default_prompts, get_task
from malt_jax.tasks.grading import extract_number
from malt_jax.tasks.math_task import math_answer_key
from tests.parity_task import ParityTask

MATH_EX = Example("m", "q", "\\frac{1}{2}")
NUM_EX = Example("n", "q", "4")
CSQA_EX = Example("c", "q", "B", meta={"choices": {"A": "river", "B": "bank", "C": "money market"}})


@pytest.fixture(scope="module")
def tasks():
    return {
        "math": get_task("math"),
        "synthetic": get_task("synthetic"),
        "gsm8k": get_task("gsm8k"),
        "csqa": get_task("csqa"),
    }


# ---------------------------------------------------------------------------------- answer_key


def test_math_key_fractions_decimals_and_slash_agree(tasks):
    m = tasks["math"]
    texts = [
        "Final Answer: \\frac12",
        "Final Answer: \\frac{1}{2}",
        "Final Answer: $\\dfrac{1}{2}$",
        "Final Answer: 1/2",
        "Final Answer: 0.5",
        "Final Answer: .5",
        "so \\boxed{\\tfrac{1}{2}}",
    ]
    assert {m.answer_key(t, MATH_EX) for t in texts} == {"1/2"}
    assert all(m.grade_example(t, MATH_EX) for t in texts)  # the grader agrees they are equal


def test_math_key_keeps_unequal_answers_apart(tasks):
    m = tasks["math"]
    ex = Example("m", "q", "\\frac{1}{3}")
    assert m.answer_key("Final Answer: 0.33", ex) != m.answer_key("Final Answer: \\frac13", ex)
    assert m.answer_key("Final Answer: \\frac13", ex) == m.answer_key("Final Answer: 2/6", ex) == "1/3"
    assert m.answer_key("Final Answer: 2", ex) == m.answer_key("Final Answer: 2.0", ex) == "2"
    assert m.answer_key("Final Answer: 2", ex) != m.answer_key("Final Answer: -2", ex)
    assert m.answer_key("no answer here", ex) is None


def test_math_key_structures_and_symbols():
    assert math_answer_key("\\{2, 1\\}") == math_answer_key("1,2") == math_answer_key("2, 1")  # unordered
    assert math_answer_key("(1, 2)") != math_answer_key("(2, 1)")  # tuples keep their order
    assert math_answer_key("[1,2)") != math_answer_key("[1,2]")
    assert math_answer_key("(\\frac12, 3)") == math_answer_key("(0.5, 3)")
    assert math_answer_key("x = 5") == math_answer_key("5") == "5"
    assert math_answer_key("\\sqrt2") == math_answer_key("\\sqrt{2}")  # normalised LaTeX string
    assert math_answer_key("$") is None


def test_math_key_is_bounded_and_eval_free(tmp_path):
    sentinel = tmp_path / "touched"
    for s in [
        "9^{9^{9^{9^{9}}}}",
        "10^{100000}",
        "\\frac{" * 500 + "1" + "}{2}" * 500,
        "9" * 100_000,
        f"__import__('os').system('touch {sentinel}')",
    ]:
        key = math_answer_key(s)
        assert key is None or isinstance(key, str)
    assert math_answer_key("2^{10}") == "1024"
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["synthetic", "gsm8k"])
def test_numeric_keys_are_canonical(tasks, name):
    t = tasks[name]
    assert t.answer_key("Final Answer: 0.50", NUM_EX) == t.answer_key("Final Answer: .5", NUM_EX) == "0.5"
    assert t.answer_key("Final Answer: 1,000", NUM_EX) == t.answer_key("so it is 1000.0", NUM_EX) == "1000"
    assert t.answer_key("Final Answer: 18.0 dollars", NUM_EX) == "18"
    assert t.answer_key("Final Answer: 18.5", NUM_EX) != t.answer_key("Final Answer: 18", NUM_EX)
    assert t.answer_key("no numbers", NUM_EX) is None


def test_csqa_key_letter_or_choice_text(tasks):
    c = tasks["csqa"]
    assert c.answer_key("Final Answer: bank", CSQA_EX) == "B"
    assert c.answer_key("Final Answer: B", CSQA_EX) == "B"
    assert c.answer_key("Final Answer: (B) bank", CSQA_EX) == "B"
    assert c.answer_key("Final Answer:  Money Market. ", CSQA_EX) == "C"
    assert c.grade_example("Final Answer:  Money Market. ", Example("c", "q", "C", meta=CSQA_EX.meta))
    assert c.answer_key("Final Answer: tree", CSQA_EX) is None
    assert c.answer_key("Final Answer: bank", Example("c", "q", "B")) is None  # no choice texts known
    assert c.answer_key("Final Answer: B", Example("c", "q", "B")) == "B"


def test_majority_vote_over_keys(tasks):
    m = tasks["math"]
    keys = [m.answer_key(t, MATH_EX) for t in ["Final Answer: \\frac12", "Final Answer: 0.5", "Final Answer: 3"]]
    assert majority_vote(keys) == "1/2"
    c = tasks["csqa"]
    keys = [c.answer_key(t, CSQA_EX) for t in ["Final Answer: A", "Final Answer: bank", "Final Answer: B"]]
    assert majority_vote(keys) == "B"


def test_default_key_is_extract():
    task = ParityTask()
    assert task.answer_key("ab", Example("p", "q", "even")) == task.extract("ab") == "even"


def test_score_votes_on_keys(tasks):
    system = System("single", 1, 3, False, False)
    texts = {"G": ["Final Answer: 3", "Final Answer: \\frac12", "Final Answer: 0.5"]}
    row = _score(system, tasks["math"], MATH_EX, texts)
    assert set(row) == {"id", "gold", "pass_answers", "pass_correct", "vote_answer", "vote_correct", "texts"}
    assert row["pass_answers"] == ["3", "1/2", "1/2"]
    assert row["pass_correct"] == [False, True, True]
    assert row["vote_answer"] == "1/2" and row["vote_correct"] is True
    row = _score(system, tasks["csqa"], CSQA_EX, {"G": ["Final Answer: A", "Final Answer: bank", "Final Answer: B"]})
    assert row["pass_answers"] == ["A", "B", "B"] and row["vote_answer"] == "B" and row["vote_correct"]


class _KeyLooserThanGrade(Task):
    """Keys: the last number anywhere; the grade: only an exact ``Final Answer: <gold>`` text, or
    (``loose``) any text that mentions the gold number. Passes with one key can differ in grade."""

    name = "key-vs-grade"

    def __init__(self, loose: bool = False):
        super().__init__()
        self.prompts = default_prompts("synthetic")
        self.loose = loose

    def _load(self, split):
        return LoadResult([])

    def extract(self, text):
        return extract_number(text)

    def grade(self, text, gold):
        if self.loose:
            return int(gold in re.findall(r"\d+", text))
        return int(text.strip() == f"Final Answer: {gold}")


def test_vote_grades_the_voted_answer_not_its_first_pass():
    """MV@k grades the voted key itself (``Task.grade_key``); copying the grade of the first pass
    with that key gave the opposite result in both cases below."""
    system = System("single", 1, 3, False, False)
    ex = Example("s", "q", "5")
    # the first pass voting "5" is graded wrong (no Final Answer line), but 5 is right
    texts = {"G": ["I think it is 5", "Final Answer: 5", "Final Answer: 3"]}
    row = _score(system, _KeyLooserThanGrade(), ex, texts)
    assert row["pass_answers"] == ["5", "5", "3"] and row["pass_correct"] == [False, True, False]
    assert row["vote_answer"] == "5" and row["vote_correct"] is True  # old: pass_correct[0] = False
    # the first pass voting "7" is graded right (it mentions 5), but 7 is wrong
    texts = {"G": ["5 or 7? Final Answer: 7", "Final Answer: 7", "Final Answer: 5"]}
    row = _score(system, _KeyLooserThanGrade(loose=True), ex, texts)
    assert row["pass_answers"] == ["7", "7", "5"] and row["pass_correct"] == [True, False, True]
    assert row["vote_answer"] == "7" and row["vote_correct"] is False  # old: pass_correct[0] = True
    # no key at all: no vote, not correct
    row = _score(system, _KeyLooserThanGrade(), ex, {"G": ["no", "numbers", "here"]})
    assert row["vote_answer"] is None and row["vote_correct"] is False


@pytest.mark.parametrize(
    "name,ex,texts",
    [
        ("math", MATH_EX, ["Final Answer: 3", "so \\boxed{\\tfrac{1}{2}}", "Final Answer: 0.5"]),
        ("synthetic", NUM_EX, ["Final Answer: 4.0", "it is 4", "Final Answer: 5"]),
        ("gsm8k", NUM_EX, ["#### 5", "Final Answer: 5 dollars", "Final Answer: 4"]),
        ("csqa", CSQA_EX, ["Final Answer: bank", "Final Answer: A", "Final Answer: (B) bank"]),
    ],
)
def test_vote_is_graded_through_the_key(tasks, monkeypatch, name, ex, texts):
    """Each task's voted key round-trips through its canonical text ``Final Answer: <key>``, and
    the row's ``vote_correct`` is that text's grade (asked of ``grade_key`` with the key)."""
    task = tasks[name]
    asked = []
    real = task.grade_key
    monkeypatch.setattr(task, "grade_key", lambda key, example: asked.append(key) or real(key, example))
    row = _score(System("single", 1, 3, False, False), task, ex, {"G": texts})
    key = row["vote_answer"]
    assert key is not None and asked == [key]
    assert task.answer_key(f"Final Answer: {key}", ex) == key
    assert row["vote_correct"] is bool(task.grade_example(f"Final Answer: {key}", ex))


# ---------------------------------------------------------------------------- explicit answers


def test_has_explicit_answer_numeric(tasks):
    t = tasks["synthetic"]
    assert t.has_explicit_answer("2 + 2 = 4.\nFinal Answer: 4")
    assert t.has_explicit_answer("**Final Answer:**\n\n4")
    assert t.has_explicit_answer("so the total is \\boxed{4}")
    assert not t.has_explicit_answer("the answer is 4")
    assert not t.has_explicit_answer("Start with 2. So for 2 + 4 = ")
    assert not t.has_explicit_answer("Final Answer:")
    assert not t.has_explicit_answer("Final Answer: none")
    assert not t.has_explicit_answer("\\boxed{}")


def test_has_explicit_answer_math(tasks):
    m = tasks["math"]
    assert m.has_explicit_answer("Final Answer: $\\frac{1}{2}$", MATH_EX)
    assert m.has_explicit_answer("We get \\boxed{\\frac12}.", MATH_EX)
    assert not m.has_explicit_answer("the answer is \\frac12", MATH_EX)


def test_has_explicit_answer_csqa_needs_a_valid_choice(tasks):
    c = tasks["csqa"]
    assert c.has_explicit_answer("Final Answer: B", CSQA_EX)
    assert c.has_explicit_answer("Final Answer: bank", CSQA_EX)
    assert not c.has_explicit_answer("Final Answer: bank")  # no example: only letters count
    assert not c.has_explicit_answer("Final Answer: tree", CSQA_EX)
    assert not c.has_explicit_answer("Final Answer: F", CSQA_EX)
    assert not c.has_explicit_answer("The answer is B.", CSQA_EX)
    assert not c.has_explicit_answer("\\boxed{B}", CSQA_EX)


# -------------------------------------------------------------------------------- grade_leaves


def test_grade_leaves_strict_and_lenient(tasks):
    t = tasks["synthetic"]
    texts = np.array(
        [
            [
                "Start with 2. So for 2 + 4 = ",  # cut off: the last number happens to be gold
                "2 + 2 = 4.\nFinal Answer: 4",  # explicit and stopped
                "2 + 2 = 4.\nFinal Answer: 4",  # explicit but cut off
                "the answer is 4",  # stopped, no Final Answer line
                "Final Answer: 5",
            ]
        ],
        object,
    )  # wrong
    stopped = np.array([[False, True, False, True, True]])
    rewards, lenient = grade_leaves(t, [NUM_EX], texts, stopped)
    assert rewards.dtype == lenient.dtype == np.float32 and rewards.shape == texts.shape
    np.testing.assert_array_equal(lenient, [[1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rewards, [[0, 1, 0, 0, 0]])
    rewards, lenient = grade_leaves(t, [NUM_EX], texts)  # stopped=None: all stopped
    np.testing.assert_array_equal(rewards, [[0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(lenient, [[1, 1, 1, 1, 0]])


def test_grade_leaves_multi_dim_and_csqa_text(tasks):
    c = tasks["csqa"]
    texts = np.array([[["Final Answer: bank", "B"], ["Final Answer: river", "Final Answer: B"]]] * 2, object)
    stopped = np.ones(texts.shape, bool)
    stopped[1, 1, 1] = False
    other = Example("c2", "q", "A", meta=CSQA_EX.meta)
    rewards, lenient = grade_leaves(c, [CSQA_EX, other], texts, stopped)
    np.testing.assert_array_equal(lenient, [[[1, 1], [0, 1]], [[0, 0], [1, 0]]])
    np.testing.assert_array_equal(rewards, [[[1, 0], [0, 1]], [[0, 0], [1, 0]]])


def test_grade_leaves_non_strict_task_rewards_the_grade():
    task = ParityTask()
    texts = np.array([["ab", "abc", "abcd"]], object)
    rewards, lenient = grade_leaves(task, [Example("p", "q", "even")], texts, np.zeros(texts.shape, bool))
    np.testing.assert_array_equal(rewards, [[1, 0, 1]])
    np.testing.assert_array_equal(lenient, rewards)


# ------------------------------------------------------------------------ run_credit fallbacks


def _fake_expansion(run_dir, with_lenient: bool):
    """A one-question 1x1x4 tree with known rewards, as the expand stage writes it."""
    q, n, m, l, t = 1, 1, 1, 4, 3
    arrays = {"index": np.arange(q), "q_tokens": np.full((q, 8), 5, np.int32), "q_lens": np.full(q, 8, np.int32)}
    for role, shape in (("G", (q, n)), ("V", (q, n, m)), ("R", (q, n, m, l))):
        arrays[f"{role}_tokens"] = np.full((*shape, t), 7, np.int32)
        arrays[f"{role}_lengths"] = np.full(shape, t, np.int32)
        arrays[f"{role}_logps"] = np.zeros(shape, np.float32)
        arrays[f"{role}_stopped"] = np.ones(shape, bool)
    arrays["R_stopped"][0, 0, 0] = [True, False, True, True]
    arrays["rewards"] = np.array([[[[1, 0, 0, 0]]]], np.float32)
    if with_lenient:
        arrays["rewards_lenient"] = np.array([[[[1, 1, 1, 0]]]], np.float32)
        arrays["rewards_explicit"] = np.array([[[[True, True, False, True]]]])
    (run_dir / "expansion").mkdir(parents=True)
    np.savez(run_dir / "expansion" / "batch_00000.npz", **arrays)


@pytest.mark.parametrize("with_lenient", [True, False])
def test_run_credit_counts_reward_fallbacks(tmp_path, with_lenient):
    from malt_jax.config import load_run_config
    from malt_jax.model.files import smollm2_gguf_path
    from malt_jax.model.tokenizer import load_tokenizer

    cfg = load_run_config(None, [f"run_dir={tmp_path / 'run'}"])
    _fake_expansion(tmp_path / "run", with_lenient)
    model = types.SimpleNamespace(tokenizer=load_tokenizer(smollm2_gguf_path()))
    summary = run_credit(cfg, model, get_task("synthetic"), tmp_path / "run")
    assert summary["leaf_accuracy"] == 0.25
    if with_lenient:
        assert summary["reward_fallback"] == {
            "leaves": 4,
            "rewarded": 1,
            "rewarded_lenient": 3,
            "no_explicit_answer": 1,
            "cut_off": 1,
        }
    else:  # an expansion written before strict rewards: no counts
        assert "reward_fallback" not in summary
    assert json.loads((tmp_path / "run" / "credit" / "summary.json").read_text()) == summary
