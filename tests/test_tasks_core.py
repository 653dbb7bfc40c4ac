"""Tasks core: registry, role prompts, seeded splits and the synthetic arithmetic family."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from malt_jax.tasks import (
    Example,
    RolePrompts,
    default_prompts,
    exprparse,
    get_task,
    role_messages,
    split_examples,
    task_options,
    train_eval_sets,
)
from malt_jax.tasks.synthetic import SyntheticArithmetic

# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors() -> None:
    for name in ("gsm8k", "math", "csqa", "synthetic"):
        task = get_task(name)
        assert task.name == name and isinstance(task.prompts, RolePrompts)
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*'csqa'.*'synthetic'"):
        get_task("gsm9k")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_vlaue'\].*max_value"):
        get_task("synthetic", max_vlaue=20)
    with pytest.raises(TypeError, match="symbolic_timeout"):
        get_task("gsm8k", symbolic_timeout=1.0)
    with pytest.raises(ValueError, match="takes no path"):
        get_task("synthetic", path="/data/x")
    assert get_task("synthetic", path="").name == "synthetic"  # TaskConfig's empty default
    assert "steps" in task_options("synthetic") and "path" not in task_options("math")


def test_custom_task_by_import_path() -> None:
    task = get_task("tests.parity_task:ParityTask")
    assert type(task).__name__ == "ParityTask" and task.grade("ab", "even") == 1
    with pytest.raises(ValueError, match=r"cannot import 'Nope' from 'tests.parity_task'"):
        get_task("tests.parity_task:Nope")
    with pytest.raises(ValueError, match=r"cannot import 'X' from 'no_such_module_xyz'"):
        get_task("no_such_module_xyz:X")
    with pytest.raises(ValueError, match="is not a malt_jax.tasks.Task subclass"):
        get_task("tests.parity_task:default_prompts")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['x'\]"):
        get_task("tests.parity_task:ParityTask", x=1)


def test_options_from_a_flat_mapping() -> None:
    options = dict((("max_value", 20), ("steps", [2, 3]), ("ops", "+-*"), ("distractors", 1)))
    task = get_task("synthetic", **options)
    assert task.num_range == (1, 20) and task.steps == (2, 3) and task.distractors == 1
    with pytest.raises(ValueError, match="steps"):
        get_task("synthetic", steps=0)
    with pytest.raises(ValueError, match="ops"):
        get_task("synthetic", ops="/")


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name", ["gsm8k", "math", "csqa", "synthetic"])
def test_default_prompts(name: str) -> None:
    p = default_prompts(name)
    assert "{question}" in p.generator
    assert "Final Answer:" in p.generator and "Final Answer:" in p.refiner
    assert "correct" in p.verifier
    for text in dataclasses.astuple(p):
        assert len(text) < 300  # short: the default model is tiny


def test_role_messages_form_one_growing_chat() -> None:
    p = default_prompts("math")
    q = r"Compute $\frac{1}{2} + {x}$."  # braces must survive
    g = role_messages(p, "generator", q)
    v = role_messages(p, "verifier", q, generator_out="G says 1")
    r = role_messages(p, "R", q, generator_out="G says 1", verifier_out="V: wrong, 2")
    assert [m["role"] for m in g] == ["system", "user"]
    assert v[:2] == g and r[:4] == v
    assert [m["role"] for m in r] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert q in g[1]["content"]
    assert r[2]["content"] == "G says 1" and r[4]["content"] == "V: wrong, 2"
    assert v[3]["content"] == p.verifier and r[5]["content"] == p.refiner
    with pytest.raises(ValueError, match="generator_out"):
        role_messages(p, "verifier", q)
    with pytest.raises(ValueError, match="unknown role"):
        role_messages(p, "critic", q)


def test_role_prompts_from_mapping_errors() -> None:
    good = {"system": "s", "generator": "Q: {question}", "verifier": "v", "refiner": "r"}
    assert RolePrompts.from_mapping(good).generator == "Q: {question}"
    with pytest.raises(ValueError, match=r"missing role prompt keys \['refiner'\]"):
        RolePrompts.from_mapping({k: v for k, v in good.items() if k != "refiner"})
    with pytest.raises(ValueError, match=r"unknown role prompt keys \['critic'\]"):
        RolePrompts.from_mapping({**good, "critic": "c"})
    with pytest.raises(ValueError, match="must contain"):
        RolePrompts.from_mapping({**good, "generator": "no placeholder"})
    with pytest.raises(ValueError, match="must not contain"):
        RolePrompts.from_mapping({**good, "verifier": "{question}"})


def test_prompt_overrides_yaml_and_partial(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("verifier: Is it right?\n")
    task = get_task("gsm8k", prompts=str(path))
    assert task.prompts.verifier == "Is it right?"
    assert task.prompts.generator == default_prompts("gsm8k").generator
    task = get_task("csqa", prompts={"system": "Be brief."})
    assert task.prompts.system == "Be brief."
    path.write_text("verifer: typo\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*verifer"):
        get_task("gsm8k", prompts=path)


# ----------------------------------------------------------------------------- splits


def make_examples(n: int) -> list[Example]:
    return [Example(id=str(i), question=f"q{i}", answer=str(i)) for i in range(n)]


def test_split_examples_deterministic_and_disjoint() -> None:
    exs = make_examples(100)
    train, evals = split_examples(exs, 30, 20, seed=0)
    assert (train, evals) == split_examples(exs, 30, 20, seed=0)
    assert len(train) == 30 and len(evals) == 20
    assert not {e.id for e in train} & {e.id for e in evals}
    assert split_examples(exs, 30, 20, seed=1)[0] != train
    assert len(split_examples(exs, 30, None, seed=0)[1]) == 70
    with pytest.raises(ValueError, match="num_eval"):
        split_examples(exs, 90, 20, seed=0)


def test_split_examples_keeps_duplicate_questions_apart() -> None:
    exs = [Example(id=str(i), question=f"q{i % 10}", answer="1") for i in range(40)]
    train, evals = split_examples(exs, 5, None, seed=3)
    assert not {e.question for e in train} & {e.question for e in evals}


def test_train_eval_sets_pools_a_single_source() -> None:
    task = get_task("synthetic", train_size=60, test_size=30)
    train, evals = train_eval_sets(task, 10, 5, seed=0)
    assert {e.id.split("-")[1] for e in train} == {"train"}
    assert {e.id.split("-")[1] for e in evals} == {"test"}
    assert (train, evals) == train_eval_sets(task, 10, 5, seed=0)


# ----------------------------------------------------------------------------- synthetic


def eval_expression(expression: str) -> int:
    value = exprparse.evaluate_exact(exprparse.parse(expression.replace("×", "*")))
    assert value.denominator == 1
    return int(value)


def test_synthetic_deterministic_and_disjoint() -> None:
    a, b = SyntheticArithmetic(seed=0), SyntheticArithmetic(seed=0)
    assert a.load("train") == b.load("train") and a.load("test") == b.load("test")
    splits = {s: {e.question for e in a.load(s)} for s in ("train", "test", "validation")}
    assert len(splits["train"]) == 2000 and len(splits["test"]) == 500
    assert not splits["train"] & splits["test"]
    assert not splits["train"] & splits["validation"]
    assert not splits["test"] & splits["validation"]
    other = {e.question for e in SyntheticArithmetic(seed=1).load("train")}
    assert other != splits["train"]
    assert not other & splits["test"]  # buckets depend on the problem only, not the seed


def test_synthetic_answers_are_exact_and_gradeable() -> None:
    task = get_task("synthetic", max_value=20, steps=3, ops="+-*", distractors=2, test_size=200)
    for ex in task.load("test"):
        assert int(ex.answer) == eval_expression(ex.meta["expression"]) >= 1
        assert ex.meta["steps"] == 3
        assert task.grade(f"Some work.\nFinal Answer: {ex.answer}", ex.answer) == 1
        assert task.grade(f"Final Answer: {int(ex.answer) + 1}", ex.answer) == 0
    assert any("×" in ex.meta["expression"] for ex in task.load("test"))


def test_synthetic_knobs() -> None:
    easy = get_task("synthetic", test_size=100).load("test")
    assert all(len(re.findall(r"\d+", e.meta["expression"])) in (2, 3) for e in easy)
    assert all(int(n) <= 9 for e in easy for n in re.findall(r"\d+", e.question))
    noisy = get_task("synthetic", distractors=2, steps=1, test_size=50).load("test")
    plain = get_task("synthetic", steps=1, test_size=50).load("test")
    sentences = lambda rows: sum(e.question.count(".") for e in rows)  # noqa: E731
    assert sentences(noisy) == sentences(plain) + 2 * len(plain)
    expr = get_task("synthetic", style="expression", num_range=(10, 99), test_size=20).load("test")
    assert all(e.question.startswith("What is ") for e in expr)
    assert all(int(e.answer) == eval_expression(e.meta["expression"]) for e in expr)


def test_synthetic_small_space_returns_what_exists() -> None:
    task = get_task("synthetic", num_range=(1, 2), steps=1, ops="+", style="expression", test_size=50)
    rows = task.load("test")
    assert 0 < len(rows) < 50 and len({e.question for e in rows}) == len(rows)
