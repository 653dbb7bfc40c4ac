"""Table-driven grading tests (GSM8K numbers, MATH LaTeX, CSQA letters) plus adversarial input."""

from __future__ import annotations

import sys
import time

import pytest

from malt_jax.tasks import exprparse
from malt_jax.tasks.grading import (
    extract_choice,
    extract_math,
    extract_number,
    grade_choice,
    grade_math,
    grade_number,
    math_equal,
)
from malt_jax.tasks.latex import last_boxed, latex_to_infix, normalize_math

# (kind, gold, model text, expected verdict)
CASES = [
    # --- GSM8K / synthetic numbers
    ("num", "18", "She sells 9 eggs for $2 each.\nFinal Answer: 18", 1),
    ("num", "18", "Final Answer: $18.00", 1),
    ("num", "1234", "Final Answer: 1,234 dollars", 1),
    ("num", "5", "Final Answer: 5 apples", 1),
    ("num", "20", "Final Answer: 20%", 1),
    ("num", "-5", "The temperature falls.\nFinal Answer: −5", 1),
    ("num", "7", "3 + 4 = 7\n#### 7", 1),
    ("num", "9", "Final Answer: 16 - 3 - 4 = 9", 1),
    ("num", "9", "**Final Answer:** **9**", 1),
    ("num", "13", "16-3 = 13 eggs are left", 1),
    ("num", "42", "Final Answer:\n\n42", 1),
    ("num", "42", "The answer is 42.", 1),
    ("num", "18", "Final Answer: 18.5", 0),
    ("num", "18", "Final Answer: 81", 0),
    ("num", "5", "Final Answer: -5", 0),
    ("num", "1000", "Final Answer: 1,000,000", 0),
    ("num", "18", "Final Answer: 19\nWait, the right total is 18.", 0),
    ("num", "18", "I am not sure.", 0),
    ("num", "18", "", 0),
    # --- MATH
    ("math", r"\frac{1}{2}", r"So the answer is $\boxed{\frac12}$.", 1),
    ("math", r"\frac{1}{2}", r"Final Answer: \dfrac{1}{2}", 1),
    ("math", r"\frac{1}{2}", "Final Answer: 0.5", 1),
    ("math", r"\frac{1}{2}", "Final Answer: 1/2", 1),
    ("math", r"\frac{1}{3}", "Final Answer: 0.33", 0),
    ("math", r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", 0),
    ("math", "10", r"The side is $\boxed{10\text{ cm}}$.", 1),
    ("math", "90", r"Final Answer: $90^\circ$", 1),
    ("math", "90", r"Final Answer: 90 degrees", 1),
    ("math", "50", r"Final Answer: 50\%", 1),
    ("math", "5", r"Final Answer: $x = 5$", 1),
    ("math", r"2\sqrt{2}", r"Final Answer: \sqrt{8}", 1),
    ("math", r"2\sqrt{2}", r"Final Answer: \sqrt{6}", 0),
    ("math", r"\frac{\sqrt{3}}{3}", r"Final Answer: \frac{1}{\sqrt{3}}", 1),
    ("math", r"\pi r^2", r"Final Answer: r^2\pi", 1),
    ("math", r"\pi", "Final Answer: 3.14159", 0),
    ("math", r"x^2+2x+1", r"Final Answer: (x+1)^2", 1),
    ("math", r"x^2+1", r"Final Answer: (x+1)^2", 0),
    ("math", r"(1,2)", r"Final Answer: \left( 1, 2 \right)", 1),
    ("math", r"(1,2)", "Final Answer: (2,1)", 0),
    ("math", r"[1,2)", "Final Answer: [1,2]", 0),
    ("math", r"(-\infty, 3]", r"Final Answer: (-\infty,3]", 1),
    ("math", "1,-2", "Final Answer: -2, 1", 1),
    ("math", r"\{1,2\}", r"Final Answer: \{2,1\}", 1),
    ("math", "10000", r"Final Answer: 10,\!000", 1),
    ("math", r"\text{(C)}", "Final Answer: (C)", 1),
    ("math", r"\frac{9}{4}", r"\boxed{\frac{9}{4}} and later \fbox{\frac{7}{4}}", 0),
    ("math", r"3", r"$\boxed{{3}}$", 1),
    ("math", r"6", r"Final Answer: $2 \cdot 3$", 1),
    # --- CSQA
    ("choice", "B", "Final Answer: B", 1),
    ("choice", "B", "Final Answer: (B) library", 1),
    ("choice", "B", "Reasoning...\nFinal Answer: **B**", 1),
    ("choice", "B", "I think the answer is (B).", 1),
    ("choice", "B", "B) library", 1),
    ("choice", "C", "Answer: C", 1),
    ("choice", "A", "A revolving door is in a bank.", 0),
    ("choice", "B", "Final Answer: C", 0),
    ("choice", "B", "the answer is b", 0),
    ("choice", "B", "Final Answer: Bank", 0),
]


@pytest.mark.parametrize("kind,gold,text,verdict", CASES)
def test_grading_table(kind: str, gold: str, text: str, verdict: int) -> None:
    grade = {"num": grade_number, "math": grade_math, "choice": grade_choice}[kind]
    assert grade(text, gold) == verdict


def test_table_is_large_and_balanced() -> None:
    assert len(CASES) >= 40
    for kind in ("num", "math", "choice"):
        verdicts = {v for k, _, _, v in CASES if k == kind}
        assert verdicts == {0, 1}


def test_extractors() -> None:
    assert extract_number("Final Answer: $1,234.50") == "1234.5"
    assert extract_number("no numbers here") is None
    assert extract_math(r"blah \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_math("The final answer is $7$. I hope it is correct.") == "7"
    assert extract_choice("Final Answer: E) wear hats") == "E"
    assert extract_choice("Final Answer: F", letters="ABCDE") is None


def test_last_boxed_nested_and_fbox() -> None:
    assert last_boxed(r"\boxed{\frac{a}{b^{2}}}") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed{1} then \fbox{2}") == "2"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("nothing") is None


def test_normalisation() -> None:
    assert normalize_math(r"\left( \dfrac12 , 3 \right)") == r"(\frac{1}{2},3)"
    assert normalize_math(r"\$5.") == "5"
    assert latex_to_infix(normalize_math(r"\pi r^2")) is not None
    assert latex_to_infix(r"\infty") is None


def test_choice_text_fallback() -> None:
    choices = {"A": "bank", "B": "library"}
    assert grade_choice("Final Answer: library", "B", choices=choices) == 1
    assert grade_choice("Final Answer: library", "B") == 0
    assert grade_choice("Final Answer: bank", "B", choices=choices) == 0


def test_graders_never_raise_on_weird_input() -> None:
    for bad in (None, 12, b"bytes", "\x00\ud800", "}}}{{{", "\\boxed{", "####", "$$$$"):
        assert grade_number(bad, "1") == 0  # type: ignore[arg-type]
        assert grade_math(bad, "1") == 0  # type: ignore[arg-type]
        assert grade_choice(bad, "A") == 0  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- adversarial

NESTED = "\\frac{" * 500 + "1" + "}{2}" * 500
PWNED = "__import__('os').system('echo pwned')"
ADVERSARIAL = [
    "Final Answer: " + "9" * 1_000_000,
    "x" * 1_000_000 + "\nFinal Answer: 1",
    "{" * 200_000 + "\\boxed{" * 50_000,
    f"Final Answer: {PWNED}",
    f"\\boxed{{{PWNED}}}",
    f"Final Answer: {NESTED}",
    f"\\boxed{{{NESTED}}}",
    "Final Answer: 10**10**10",
    "Final Answer: 10^{10^{10}}",
    "Final Answer: 9^{9^{9^{9}}}",
    "Final Answer: " + "1" * 5000,
    "Final Answer: (" * 3000 + "1" + ")" * 3000,
    "Final Answer: \\sqrt{" * 400 + "2" + "}" * 400,
    "Final Answer: " + "+".join(["x"] * 5000),
]


@pytest.mark.parametrize("idx", range(len(ADVERSARIAL)))
def test_adversarial_inputs_bounded(idx: int, capfd: pytest.CaptureFixture[str]) -> None:
    text = ADVERSARIAL[idx]
    start = time.monotonic()
    results = [
        grade_number(text, "1"),
        grade_math(text, "1"),
        grade_math(text, "x^2"),
        grade_choice(text, "A"),
    ]
    assert time.monotonic() - start < 10.0
    assert set(results) <= {0, 1}
    assert "pwned" not in capfd.readouterr().out


def test_huge_power_is_not_evaluated() -> None:
    start = time.monotonic()
    assert not math_equal("10^{10^{10}}", "10^{10^{10}}+1")
    assert not math_equal("2^{10000000}", "2")
    assert time.monotonic() - start < 10.0


def test_parser_rejects_code() -> None:
    for src in (PWNED, "().__class__", "a[0]", "lambda: 1", "1;2", "x.y"):
        with pytest.raises(exprparse.ParseError):
            exprparse.parse(src)
    assert "os" not in vars(sys.modules["malt_jax.tasks.exprparse"])


def test_parser_depth_and_size_caps() -> None:
    with pytest.raises(exprparse.ParseError):
        exprparse.parse("(" * 1000 + "1" + ")" * 1000)
    with pytest.raises(exprparse.ParseError):
        exprparse.parse("+".join(["1"] * 1000))
    with pytest.raises(exprparse.TooBig):
        exprparse.evaluate_exact(exprparse.parse("10^(10^10)"))


def test_sympy_worker_timeout_kills_and_recovers() -> None:
    from malt_jax.tasks.symbolic import SympyWorker

    worker = SympyWorker()
    try:
        assert worker.equal("2*sqrt(2)", "sqrt(8)", timeout=30.0) is True
        start = time.monotonic()
        assert worker.equal("10^(10^10)", "x", timeout=1.0) is None  # bypasses the pre-check
        assert time.monotonic() - start < 5.0
        assert worker.equal("x^2 - 1", "(x-1)*(x+1)", timeout=30.0) is True  # restarted
        assert worker.restarts == 2
    finally:
        worker.close()


def test_symbolic_budget() -> None:
    assert math_equal("(x+1, 2y)", "(1+x, y+y)")
    assert not math_equal("(x+1, 2y)", "(1+x, y+y)", timeout=0.0)  # budget spent: not equal
    assert not math_equal("(x+1, 2y)", "(1+x, y+y)", symbolic=False)
    assert math_equal("(0.5, 2)", r"(\frac12, 2)", symbolic=False)  # exact numbers need no sympy
