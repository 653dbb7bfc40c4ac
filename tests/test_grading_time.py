"""Grading time on adversarial inputs: every grader, extractor, answer key and verdict parser
runs in time linear (or bounded) in its input, whatever the text.

Model text is read up to ``grading.MAX_TEXT_CHARS`` (20k) characters, so a super-linear
regex there is a denial of service: the old CSQA answer-phrase regex took 30 s on "answer",
20k spaces and "z". Each function below is timed on many generated adversarial families at
1.25k, 5k and 20k characters. Timings are CPU time (``time.process_time``, so a busy machine
does not inflate them) with the garbage collector paused, and a check only fails after a
re-measurement (best of several runs). Each 4x step in size may cost at most 8x (linear is
4x, quadratic 16x) plus a small absolute slack, and 20k characters must take under 2 s
(about 50 ms today on a slow machine). The small sizes come first, so super-linear code fails
at 5k instead of hanging at 20k.

The rewritten regexes are also checked against the old ones on random short strings (same
matches), since the graders' results must not change.
"""

from __future__ import annotations

import contextlib
import gc
import random
import re
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest

from malt_jax.evaluation.stats import parse_verdict
from malt_jax.stages.eval import critique_verdict
from malt_jax.tasks import Example, Task, exprparse, get_task, grading
from malt_jax.tasks.latex import last_boxed, latex_to_infix, normalize_math
from malt_jax.tasks.math_task import math_answer_key

SIZES = (1_250, 5_000, 20_000)  # 20k = grading.MAX_TEXT_CHARS
STEP_GROWTH = 8.0  # allowed cost ratio per 4x size step (linear: 4, quadratic: 16)
SLACK_S = 0.02
SMALL_LIMIT_S = 0.25  # 1.25k characters (today: ~3 ms)
BIG_LIMIT_S = 2.0  # 20k characters (today: ~50 ms)


# ----------------------------------------------------------------------------- input families


def _rep(unit: str, n: int, head: str = "", tail: str = "") -> str:
    """``head`` + ``unit`` repeated to about ``n`` characters + ``tail``."""
    return head + unit * max(1, (n - len(head) - len(tail)) // len(unit)) + tail


_TOKENS = [
    *("answer", "Answer is", "is", ":", " ", "  ", "\n", "(", "(A", "A", "B)", "option", "choice"),
    *("Final Answer:", "final", "**", "\\boxed{", "\\fbox{", "{", "}", "$", "1", "23", ",", "."),
    *("-", "+", "=", "####", "\\frac", "\\text{", "^", "\\circ", "\\sqrt", "x", "\\\\", "%"),
    *("\\left(", "\\right)", "not", "Verdict:", "correct", "wrong", "the", "e", "\\{", "\\}"),
]


def _mixed(seed: int) -> Callable[[int], str]:
    def make(n: int) -> str:
        rng, out, size = random.Random(seed), [], 0
        while size < n:
            token = rng.choice(_TOKENS)
            out.append(token)
            size += len(token)
        return "".join(out)

    return make


FAMILIES: dict[str, Callable[[int], str]] = {
    # whitespace
    "spaces": lambda n: " " * n,
    "newlines": lambda n: "\n" * n,
    "tabs_spaces": lambda n: _rep("\t \u00a0", n),
    # answer phrases (CSQA letters, "the answer is")
    "answer_spaces_z": lambda n: _rep(" ", n, "answer", "z"),
    "answer_is_spaces_z": lambda n: _rep(" ", n, "The answer is", "z"),
    "answer_colons_z": lambda n: _rep(":", n, "answer", "z"),
    "answer_colon_space_z": lambda n: _rep(": ", n, "answer", "z"),
    "answer_spaces_is_spaces": lambda n: _rep(" ", n // 2, "answer") + _rep(" ", n // 2, "is", "(z"),
    "answer_spaces_option_spaces": lambda n: _rep(" ", n // 2, "answer") + _rep(" ", n // 2, "option", "z"),
    "answer_repeat": lambda n: _rep("answer ", n),
    "answer_is_repeat": lambda n: _rep("answer is ", n),
    "option_repeat": lambda n: _rep("option ", n),
    "choice_colon_repeat": lambda n: _rep("Choice: ", n),
    "paren_letter_repeat": lambda n: _rep("(A", n),
    "answer_paren_repeat": lambda n: _rep("answer (", n),
    "letter_words": lambda n: _rep("A B C D E ", n),
    # Final Answer lines
    "final_answer_repeat": lambda n: _rep("Final Answer:", n),
    "final_answer_spaces": lambda n: _rep(" ", n, "Final Answer:"),
    "final_spaces_z": lambda n: _rep(" ", n, "final", "z"),
    "final_answer_is_stars": lambda n: _rep(" ", n // 2, "final answer") + _rep("* ", n // 2, "is"),
    "final_answer_newlines": lambda n: _rep("\n", n, "Final Answer:", "7"),
    "final_markdown": lambda n: _rep("*_#", n, "**Final Answer:**"),
    # boxes and braces
    "boxed_open_repeat": lambda n: _rep("\\boxed{", n),
    "boxed_nested": lambda n: _rep("\\boxed{", n // 2) + _rep("}", n // 2),
    "final_boxed_open_braces": lambda n: _rep("{", n, "Final Answer: \\boxed{"),
    "open_braces": lambda n: "{" * n,
    "close_braces": lambda n: "}" * n,
    "escaped_braces": lambda n: _rep("\\{", n, "\\boxed{"),
    "boxed_space_word": lambda n: _rep("x", n, "\\boxed "),
    "backslashes": lambda n: "\\" * n,
    # numbers
    "digits": lambda n: "1" * n,
    "digits_commas": lambda n: _rep("1,", n),
    "digits_thousands": lambda n: _rep(",123", n, "1"),
    "digits_bad_thousands": lambda n: _rep("123,45", n),
    "digits_dots": lambda n: _rep("1.", n),
    "minus_run": lambda n: _rep("-", n, "", "1"),
    "signs_dollars": lambda n: _rep("- $ ", n),
    "hashes": lambda n: _rep("####", n),
    "hash_numbers": lambda n: _rep("#### 1 ", n),
    "final_equals": lambda n: _rep("1=", n, "Final Answer: "),
    "final_commas": lambda n: _rep("1,", n, "Final Answer: ", "1"),
    # dollars (MATH delimiters)
    "dollars": lambda n: "$" * n,
    "final_dollars_x": lambda n: _rep("$", n, "Final Answer: ", "x"),
    "final_dollar_spaces": lambda n: _rep("$ ", n, "Final Answer: "),
    "answer_is_dollars_x": lambda n: _rep("$", n, "the answer is ", "x"),
    # LaTeX answers
    "final_frac_repeat": lambda n: _rep("\\frac", n, "Final Answer: "),
    "final_frac_spaces": lambda n: _rep(" ", n, "Final Answer: \\frac", "1"),
    "final_frac1_spaces": lambda n: _rep(" ", n, "Final Answer: \\frac1", "x"),
    "final_text_open": lambda n: _rep("\\text{", n, "Final Answer: "),
    "final_unit_spaces": lambda n: _rep(" ", n, "Final Answer: 1\\text{a"),
    "final_unit_letters": lambda n: _rep("a ", n, "Final Answer: 1\\text{"),
    "final_caret_spaces": lambda n: _rep(" ", n, "Final Answer: ^", "x"),
    "final_circ_spaces": lambda n: _rep(" ", n, "Final Answer: ^{", "x"),
    "final_sqrt_repeat": lambda n: _rep("\\sqrt", n, "Final Answer: "),
    "final_product": lambda n: _rep("2*", n, "Final Answer: ", "2"),
    "final_power_tower": lambda n: _rep("2^", n, "Final Answer: ", "2"),
    "final_parens": lambda n: _rep("(", n // 2, "Final Answer: ") + ")" * (n // 2),
    "final_letters": lambda n: _rep("x", n, "Final Answer: "),
    # answers just under the parser's 400-token cap, padded: deep trees, bounded work
    "final_deep_symbol_product": lambda n: _rep("x", 404, "Final Answer: ", "\n") + " " * (n - 405),
    "final_deep_numeric_product": lambda n: "Final Answer: " + "*".join(["3"] * 200) + "\n" + " " * (n - 415),
    "final_set": lambda n: _rep("x,", n, "Final Answer: \\{", "\\}"),
    "final_left_paren": lambda n: _rep("\\left(", n, "Final Answer: "),
    "final_lhs_spaces": lambda n: _rep(" ", n, "Final Answer: x", "=1"),
    # verdicts and critiques
    "not_spaces_z": lambda n: _rep(" ", n, "not", "z"),
    "not_repeat": lambda n: _rep("not ", n),
    "verdict_spaces_z": lambda n: _rep(" ", n, "verdict", "z"),
    "verdict_repeat": lambda n: _rep("Verdict:", n),
    "the_spaces_z": lambda n: _rep(" ", n, "the", "z"),
    "correct_answer_is_spaces": lambda n: _rep(" ", n, "the correct answer is"),
    "correct_answer_repeat": lambda n: _rep("correct answer ", n),
    "stated_sentence": lambda n: _rep("a", n, "The correct answer is "),
    # random mixtures of all the tokens above
    **{f"mixed_{seed}": _mixed(seed) for seed in range(6)},
}


# ----------------------------------------------------------------------------- functions

CSQA_CHOICES = {"A": "river", "B": "bank", "C": "money market", "D": "answer", "E": "a b"}
EXAMPLES = {
    "gsm8k": Example("n", "q", "42"),
    "synthetic": Example("s", "q", "42"),
    "math": Example("m", "q", "\\frac{1}{2}"),
    "csqa": Example("c", "q", "B", meta={"choices": CSQA_CHOICES}),
}


def _task_functions(task: Task, ex: Example) -> dict[str, Callable[[str], Any]]:
    return {
        "extract": task.extract,
        "grade": lambda s: task.grade(s, ex.answer),
        "grade_example": lambda s: task.grade_example(s, ex),
        "answer_key": lambda s: task.answer_key(s, ex),
        "has_explicit_answer": lambda s: task.has_explicit_answer(s, ex),
        "critique_verdict": lambda s: critique_verdict(task, s, f"Final Answer: {ex.answer}", ex),
    }


def _functions() -> dict[str, Callable[[str], Any]]:
    """Every grader / extractor / answer key of every task, and the verdict parsers."""
    # symbolic=False: sympy runs in a worker process under a deadline (tests/test_grading.py);
    # everything before it (extraction, normalisation, parsing, exact arithmetic) is timed here.
    tasks = {name: get_task(name) for name in EXAMPLES if name != "math"}
    tasks["math"] = get_task("math", symbolic=False)
    out: dict[str, Callable[[str], Any]] = {}
    for name, task in tasks.items():
        for what, fn in _task_functions(task, EXAMPLES[name]).items():
            out[f"{name}.{what}"] = fn
    out["math.grade_vs_symbolic_gold"] = lambda s: grading.grade_math(s, "x+1", symbolic=False)
    out["math.math_equal_raw"] = lambda s: grading.math_equal(s, s + "1", symbolic=False)
    out["math.math_answer_key_raw"] = math_answer_key
    out["math.latex_to_infix_raw"] = lambda s: latex_to_infix(normalize_math(s))
    out["math.last_boxed"] = last_boxed
    out["csqa.grade_choice_by_text"] = lambda s: grading.grade_choice(s, "B", "ABCDE", CSQA_CHOICES)
    out["parse_verdict"] = parse_verdict
    return out


FUNCTIONS = _functions()


def _cost(fn: Callable[[str], Any], text: str, repeats: int) -> float:
    """Best CPU time of ``repeats`` calls (GC paused, so a collection is not billed to ``fn``)."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.process_time()
            fn(text)
            best = min(best, time.process_time() - start)
    finally:
        if enabled:
            gc.enable()
    return best


def _growth_failure(fn: Callable[[str], Any], family: Callable[[int], str]) -> str | None:
    """None when ``fn`` scales linearly on ``family``, else a description of the failure."""
    texts = [family(n) for n in SIZES]
    costs: list[float] = []
    for i, text in enumerate(texts):
        cost = _cost(fn, text, 1)
        limit = SMALL_LIMIT_S if i == 0 else min(BIG_LIMIT_S, STEP_GROWTH * costs[-1] + SLACK_S)
        if cost > limit:  # re-measure (best of 5, previous size too) before failing
            if i:
                costs[-1] = _cost(fn, texts[i - 1], 5)
                limit = min(BIG_LIMIT_S, STEP_GROWTH * costs[-1] + SLACK_S)
            cost = _cost(fn, text, 5)
            if cost > limit:
                sizes = ", ".join(f"{n}: {c * 1e3:.1f} ms" for n, c in zip(SIZES, [*costs, cost]))
                return f"{sizes} (limit {limit * 1e3:.1f} ms)"
        costs.append(cost)
    return None


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_time_grows_linearly_on_adversarial_inputs(name: str) -> None:
    fn = FUNCTIONS[name]
    failures = {fam: why for fam, make in FAMILIES.items() if (why := _growth_failure(fn, make)) is not None}
    assert not failures, f"{name} is super-linear on: {failures}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_text_past_the_cap_is_bounded(name: str) -> None:
    """200k characters (10x the cap; the adversarial part in the last 20k, which graders
    read) take well under 2 s."""
    fn = FUNCTIONS[name]
    for fam in ("answer_spaces_z", "answer_spaces_option_spaces", "final_dollars_x", "mixed_0", "not_repeat"):
        text = "\n" * 180_000 + FAMILIES[fam](grading.MAX_TEXT_CHARS)
        cost = _cost(fn, text, 1)
        if cost > BIG_LIMIT_S:
            cost = _cost(fn, text, 3)
        assert cost < BIG_LIMIT_S, f"{name} on {fam} (200k chars): {cost:.2f} s"


def test_families_cover_the_text_cap() -> None:
    assert SIZES[-1] == grading.MAX_TEXT_CHARS
    for make in FAMILIES.values():
        assert 0.9 * SIZES[-1] <= len(make(SIZES[-1])) <= 1.1 * SIZES[-1] + 30


# ----------------------------------------------------------------------------- same results

_OLD_PHRASE = (
    r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?[:\s]*(?:(?i:option|choice)\s*)?"
    r"\(?([{letters}])(?![A-Za-z])"
)
_PHRASE_TOKENS = ["answer", "Answer", "OPTION", "choice", "Choice", "is", "IS", "Is", " ", "  ", "\n", ":", "("]
_PHRASE_TOKENS += ["A", "B", "C", "I", "O", "E", "s", "x", "Ab", "B)", ".", "option"]


@pytest.mark.parametrize("letters", ["ABCDE", "ABCDEFGHIJKLMNOP"])
def test_answer_phrase_regex_matches_the_old_one(letters: str) -> None:
    """The possessive rewrite finds exactly the old matches (spans and letters)."""
    old, new = re.compile(_OLD_PHRASE.format(letters=letters)), grading._answer_phrase_re(letters)
    rng = random.Random(0)
    for _ in range(4000):
        s = "".join(rng.choice(_PHRASE_TOKENS) for _ in range(rng.randint(1, 10)))
        expected = [(m.span(), m.group(1)) for m in old.finditer(s)]
        assert [(m.span(), m.group(1)) for m in new.finditer(s)] == expected, repr(s)
        assert grading._answer_phrase_letter(s, letters) == (expected[-1][1] if expected else None)


def test_math_delimiter_regex_matches_the_old_one() -> None:
    old = re.compile(r"\$+([^$]+)\$+")
    rng = random.Random(1)
    for _ in range(4000):
        s = "".join(rng.choice(["$", "$$", "a", " ", "1", "\\(", "x."]) for _ in range(rng.randint(0, 10)))
        m_old, m_new = old.search(s), grading._MATH_DELIMS_RE.search(s)
        assert (m_old and m_old.group(1)) == (m_new and m_new.group(1)), repr(s)


def _old_is_numeric(node: exprparse.Node) -> bool:
    if node[0] == "num":
        return True
    if node[0] in ("name", "const", "func"):
        return False
    return all(_old_is_numeric(child) for child in node[1:])


def _old_evaluate(node: exprparse.Node) -> Fraction:
    kind = node[0]
    if kind == "num":
        return Fraction(node[1])
    if kind in ("name", "const", "func"):
        raise exprparse.Unsupported(kind)
    if kind == "neg":
        return -_old_evaluate(node[1])
    a, b = _old_evaluate(node[1]), _old_evaluate(node[2])
    return exprparse._apply(kind, a, b)


def _old_check_bounded(node: exprparse.Node) -> None:
    if _old_is_numeric(node):
        with contextlib.suppress(exprparse.Unsupported, ZeroDivisionError):
            _old_evaluate(node)
    if node[0] == "pow" and _old_is_numeric(node[2]):
        try:
            exponent = _old_evaluate(node[2])
        except (exprparse.Unsupported, ZeroDivisionError):
            exponent = Fraction(0)
        if abs(exponent) > exprparse.MAX_EXPONENT:
            raise exprparse.TooBig("exponent too large")
    for child in node[1:]:
        if isinstance(child, tuple):
            _old_check_bounded(child)


def _outcome(fn: Callable[[exprparse.Node], Any], node: exprparse.Node) -> Any:
    """``fn(node)``, or the name of the error it raises."""
    try:
        return fn(node)
    except (ArithmeticError, ValueError) as e:
        return type(e).__name__


def test_linear_tree_evaluation_matches_the_old_recursion() -> None:
    """``is_numeric``/``evaluate_exact``/``check_bounded`` (now one bottom-up pass each) give the
    old recursive results, errors included, on random expressions."""
    atoms = ["0", "1", "2", "3", "1.5", "65", "100", "x", "pi", "sqrt(2)", "(1/2)", "(2^70)", "(0-1)"]
    ops = ["+", "-", "*", "/", "^", " "]
    rng = random.Random(2)
    for _ in range(1500):
        text = rng.choice(atoms)
        for _ in range(rng.randint(0, 6)):
            text += rng.choice(ops) + rng.choice(atoms)
            if rng.random() < 0.3:
                text = f"({text})"
            if rng.random() < 0.1:
                text = "-" + text
        try:
            node = exprparse.parse(text)
        except exprparse.ParseError:
            continue
        assert exprparse.is_numeric(node) == _old_is_numeric(node), text
        assert _outcome(exprparse.evaluate_exact, node) == _outcome(_old_evaluate, node), text
        assert _outcome(exprparse.check_bounded, node) == _outcome(_old_check_bounded, node), text


def test_long_chains_do_not_hit_the_recursion_limit() -> None:
    """A 399-factor product parses (400 tokens) into a tree 399 levels deep: the old recursive
    ``is_numeric`` raised RecursionError (grading 0 with a logged traceback)."""
    letters = "x" * 399
    node = exprparse.parse(" ".join(letters))
    assert not exprparse.is_numeric(node)
    exprparse.check_bounded(node)
    assert not grading.math_equal(letters, letters + "1", symbolic=False)
    numeric = "+".join(["1"] * 200)
    assert exprparse.evaluate_exact(exprparse.parse(numeric)) == 200
    assert grading.math_equal(numeric, "200", symbolic=False)
    assert math_answer_key(numeric) == "200"


def test_check_bounded_is_linear_in_the_tree() -> None:
    """Every numeric subtree used to be re-evaluated for each ancestor: quadratic in the
    (token-capped) tree, 120 ms for a 200-factor product against ~2 ms now."""
    small, big = (exprparse.parse("*".join(["3"] * k)) for k in (50, 200))
    exprparse.check_bounded(big)
    cost_small = _cost(lambda _: exprparse.check_bounded(small), "", 5)
    cost_big = _cost(lambda _: exprparse.check_bounded(big), "", 5)
    assert cost_big <= STEP_GROWTH * cost_small + 0.005, (cost_small, cost_big)
