"""The testbed task and its pretraining corpus: traces parse with the task's own graders, answer
keys and verdict parser; splits are disjoint and no held-out problem is a pretraining fact; the
knobs set the corpus's statistics; bad knobs are refused naming the key."""

from __future__ import annotations

import re

import pytest

from malt_jax.evaluation.stats import parse_verdict
from malt_jax.tasks import get_task, testbed as tb
from malt_jax.tasks.testbed import borrows, role_texts

TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.S)


def _dialogues(corpus, n=400, split="train"):
    """(system, user, reply) of every dialogue in the first ``n`` documents."""
    out = []
    for doc in corpus.documents(split, 0, n):
        for item in doc.split("<|endoftext|>"):
            turns = TURN.findall(item)
            if turns:
                roles = [r for r, _ in turns]
                assert roles == ["system", "user", "assistant"], item
                out.append(tuple(c for _, c in turns))
            else:  # a block of fact lines
                for line in item.split("\n"):
                    a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
                    assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), line
    return out


def test_borrows():
    assert borrows(63, 27) and borrows(100, 1) and borrows(52, 9)
    assert not borrows(63, 21) and not borrows(99, 99) and not borrows(10, 0)


def test_every_trace_parses_with_the_tasks_own_graders():
    task = tb.TestbedTask()
    dialogues = _dialogues(task.corpus())
    systems = {s for s, _, _ in dialogues}
    assert systems == {"Solve.", "Check.", "Fix."}
    for system, user, reply in dialogues:
        lines = user.split("\n")
        a, b = map(int, lines[0].split("-"))
        ex = _example(a, b)
        if system == "Solve.":  # G: always the right answer
            assert task.grade_example(reply, ex) == 1 and task.has_explicit_answer(reply, ex)
            continue
        quoted = int(task.extract(lines[1]))
        if system == "Check.":  # V: the sum and its distance to a are right; the verdict parses
            c, bb, d, x, y, e = map(int, re.match(r"(\d+)\+(\d+)=(\d+)\. (\d+)-(\d+)=(\d+)\.", reply).groups())
            assert (c, bb, d) == (quoted, b, quoted + b)
            assert {x, y} == {d, a} and x >= y and e == abs(d - a)
            assert parse_verdict(reply) in (True, False)
        else:  # R: its final answer is the quoted one, or the right one when it corrects
            verdict = parse_verdict(lines[2])
            key = task.answer_key(reply, ex)
            assert key is not None and task.has_explicit_answer(reply, ex)
            assert key == str(quoted) or (verdict is False and key == str(a - b)), (user, reply)


def _example(a: int, b: int):
    from malt_jax.tasks import Example

    return Example(id=f"{a}-{b}", question=f"{a}-{b}", answer=str(a - b))


@pytest.mark.parametrize(("a", "b", "answer"), [(63, 27, 46), (63, 27, 26), (63, 27, 37), (52, 9, 42), (57, 21, 36)])
def test_following_refiner_always_lands_on_the_right_answer(a, b, answer):
    texts = role_texts(a, b, answer, verdict_wrong=True, follow=True)
    task = tb.TestbedTask()
    assert task.grade(texts["refiner"], str(a - b)) == 1
    assert parse_verdict(texts["verifier"]) is False
    kept = role_texts(a, b, answer, verdict_wrong=True, follow=False)["refiner"]
    assert task.extract(kept) == str(answer)


def test_forgotten_borrow_is_fixed_with_subtractions_that_do_not_borrow():
    """The critique's distance and the refiner's corrective step for the typical error use only
    non-borrowing subtraction (while the critique's sum stays below 100)."""
    for a in range(10, 90):
        for b in range(1, a):
            if not borrows(a, b):
                continue
            texts = role_texts(a, b, a - b + 10, True, True)
            for x, y in re.findall(r"(\d+)-(\d+)=", texts["verifier"] + " " + texts["refiner"]):
                assert not borrows(int(x), int(y)), (a, b, texts)


def test_splits_are_disjoint_and_held_out_problems_are_never_pretraining_facts():
    task = tb.TestbedTask()
    splits = {s: set(task.problems(s)) for s in ("test", "validation", "train", "pretrain")}
    names = list(splits)
    for i, s in enumerate(names):
        for t in names[i + 1 :]:
            assert not splits[s] & splits[t], (s, t)
    assert sum(map(len, splits.values())) == sum(a - 1 for a in range(10, 100))
    held_out = splits["test"] | splits["validation"] | splits["train"]
    questions, facts, corrections = set(), set(), set()
    for doc in task.corpus().documents("train", 0, 300):
        for item in doc.split("<|endoftext|>"):
            turns = TURN.findall(item)
            if not turns:
                facts |= {(int(a), int(b)) for a, b in re.findall(r"^(\d+)-(\d+)=", item, re.M)}
                continue
            questions.add(tuple(map(int, turns[1][1].split("\n")[0].split("-"))))
            corrections |= {(int(a), int(b)) for a, b in re.findall(r"(\d+)-(\d+)=", turns[2][1])}
    assert questions and facts and corrections
    assert (questions | facts) <= splits["pretrain"]
    # the refiner's corrective steps are subtractions of other numbers: any that is also a
    # held-out problem never borrows (the skill G lacks is never shown on a held-out problem)
    assert not any(borrows(a, b) for a, b in corrections & held_out)


def test_loaded_questions_grade_with_their_answers():
    task = get_task("testbed", test_size=50)
    exs = task.load("test")
    assert len(exs) == 50 and len({e.question for e in exs}) == 50
    for e in exs:
        a, b = map(int, e.question.split("-"))
        assert e.answer == str(a - b) and e.meta["borrow"] == borrows(a, b)
        assert task.grade_example(f"Final Answer: {a - b}", e) == 1
        assert task.grade_example(f"Final Answer: {a - b + 10}", e) == 0


def test_corpus_is_deterministic_and_seeded():
    a, b = tb.TestbedTask().corpus(), tb.TestbedTask().corpus()
    assert a.documents("train", 5, 3) == b.documents("train", 5, 3) == [a.document("train", i) for i in (5, 6, 7)]
    assert tb.TestbedTask(seed=1).corpus().document("train", 5) != a.document("train", 5)
    assert a.document("validation", 0) != a.document("train", 0)


def _rates(task, n=1500):
    dialogues = _dialogues(task.corpus(), n)
    g = [d for d in dialogues if d[0] == "Solve."]
    v = [d for d in dialogues if d[0] == "Check."]
    says_wrong_given = {True: [], False: []}
    for _, user, reply in v:
        q, ans = user.split("\n")
        a, b = map(int, q.split("-"))
        right = int(ans.removeprefix("Final Answer: ")) == a - b
        says_wrong_given[right].append(parse_verdict(reply) is False)
    borrow = [borrows(*map(int, d[1].split("-"))) for d in g]
    return sum(borrow) / len(borrow), says_wrong_given


def test_knobs_set_the_corpus_statistics():
    borrow, given = _rates(tb.TestbedTask(borrow_share=0.3, v_detect=0.9, v_false_alarm=0.1))
    assert abs(borrow - 0.3) < 0.08
    assert abs(sum(given[False]) / len(given[False]) - 0.9) < 0.08
    assert abs(sum(given[True]) / len(given[True]) - 0.1) < 0.08
    borrow, given = _rates(tb.TestbedTask(borrow_share=0.0, v_detect=0.5, v_false_alarm=0.5))
    assert borrow == 0.0
    assert abs(sum(given[False]) / len(given[False]) - 0.5) < 0.1


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"v_detect": 1.5}, "task.options.v_detect"),
        ({"v_false_alarm": -0.1}, "task.options.v_false_alarm"),
        ({"r_follow": float("nan")}, "task.options.r_follow"),
        ({"borrow_share": "lots"}, "task.options.borrow_share"),
        ({"role_mix": [1, 2]}, "task.options.role_mix"),
        ({"role_mix": [0, 0, 0]}, "task.options.role_mix"),
        ({"split_buckets": [3, 3, 3, 3]}, "task.options.split_buckets"),
        ({"max_a": 5}, "task.options.max_a"),
        ({"facts_per_item": 0}, "task.options.facts_per_item"),
        ({"test_size": -1}, "task.options.test_size"),
    ],
)
def test_bad_knobs_name_the_key(options, key):
    with pytest.raises(tb.TestbedError, match=re.escape(key)):
        get_task("testbed", **options)


def test_unknown_knob_lists_the_valid_ones():
    with pytest.raises(TypeError, match="v_detect"):
        get_task("testbed", v_detection=0.5)


def test_role_skills_count_fixes_breaks_and_verdicts():
    """role_skills on hand-made chain rows equals counts made by hand."""
    from malt_jax.stages.eval import role_skills

    task = tb.TestbedTask()
    exs = [_example(63, 27), _example(57, 21)]  # answers 36, 36

    def row(gs, vs, rs):
        return {"texts": {"G": gs, "V": vs, "R": rs}}

    rows = [
        # G wrong, V says wrong, R fixes; G right, V says correct, R keeps
        row(["Final Answer: 46", "Final Answer: 36"], ["46+27=73. Verdict: wrong", "36+27=63. Verdict: correct"],
            ["73-63=10. 46-10=36. Final Answer: 36", "Final Answer: 36"]),
        # G right, V false alarm, R breaks; G wrong, V misses, R keeps the wrong answer
        row(["Final Answer: 36", "Final Answer: 35"], ["36+21=57. Verdict: wrong", "35+21=56. Verdict: correct"],
            ["Final Answer: 26", "Final Answer: 35"]),
    ]  # fmt: skip
    s = role_skills(task, exs, rows)
    assert s["generator"] == {"accuracy": 0.5, "n": 4}
    assert s["refiner"]["fixed"] == 1 and s["refiner"]["g_wrong"] == 2 and s["refiner"]["fix_rate"] == 0.5
    assert s["refiner"]["broken"] == 1 and s["refiner"]["g_right"] == 2 and s["refiner"]["break_rate"] == 0.5
    v = s["verifier"]
    assert (v["right_says_correct"], v["right_says_incorrect"], v["wrong_says_incorrect"], v["wrong_says_correct"]) == (
        1,
        1,
        1,
        1,
    )
    assert v["balanced_accuracy"] == 0.5


def test_corpus_dialogues_tokenize_as_the_pipeline_prompts_them(tmp_path):
    """A tokenizer trained on the corpus encodes a corpus dialogue's prompt exactly as the
    pipeline's encode_chat (literal content, the template's markers as control tokens) does."""
    from malt_jax.model.small_tokenizer import train_tokenizer
    from malt_jax.tasks.prompts import separate_messages
    from malt_jax.tasks.testbed import render_chat

    task = tb.TestbedTask()
    tok = train_tokenizer(task.corpus().documents("train", 0, 200), 300, tmp_path, kind="bytelevel")
    vocab = tok.backend.get_vocab()
    assert not any(t in vocab for t in ("<|", "|>", "endoftext"))  # special strings never merged
    for role, outs in (("generator", ()), ("verifier", ("Final Answer: 46",)), ("refiner", ("Final Answer: 46", "x"))):
        msgs = separate_messages(task.prompts, role, "63-27", *outs)
        corpus_ids = tok.backend.encode(render_chat(msgs, add_generation_prompt=True), add_special_tokens=False).ids
        assert tok.encode_chat(msgs) == corpus_ids, role


def test_run_budgets_fit_every_role_output(tmp_path):
    """experiments/testbed.yaml's per-role token budgets hold the longest G / V / R output the
    corpus teaches (+ the end-of-turn marker) under the tokenizer pretraining trains: a budget
    that cuts the critique before its verdict leaves the refiner nothing to follow."""
    from pathlib import Path

    from malt_jax.config import load_run_config
    from malt_jax.training.corpus import get_corpus
    from malt_jax.training.pretrain import prepare_tokenizer
    from malt_jax.training.pretrain_config import load_pretrain_config

    root = Path(__file__).resolve().parent.parent
    run = load_run_config(root / "experiments/testbed.yaml")
    pre = load_pretrain_config(root / "experiments/pretrain/testbed.yaml", ["tokenizer.sample_docs=300"])
    corpus = get_corpus(pre.corpus.name, **dict(pre.corpus.options))
    tok = prepare_tokenizer(pre, corpus, tmp_path, write=False)
    longest = dict.fromkeys(("generator", "verifier", "refiner"), 0)
    assert "max_a" not in dict(run.task.options)  # the default two-digit questions
    for a in range(10, 100):
        for b in range(1, a):
            for answer in {a - b, *tb.wrong_answers(a, b)}:
                for role, text in role_texts(a, b, answer, True, True).items():
                    longest[role] = max(longest[role], len(tok.encode(text, add_special_tokens=False)))
    budgets = dict(zip(("generator", "verifier", "refiner"), run.sampling.budgets()))
    for role in longest:
        assert longest[role] + 1 <= budgets[role], (role, longest[role], budgets[role])
