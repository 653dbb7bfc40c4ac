"""Embedded synthetic arithmetic word problems (no download), seeded and exactly graded.

A problem starts with a quantity and applies ``steps`` operations (``+``, ``-``, ``*``) to it,
optionally with distractor sentences whose numbers are irrelevant::

    Mia has 7 marbles. Mia finds 3 more marbles. Mia gives 4 marbles to Sam.
    How many marbles does Mia have now?          -> 6

Difficulty knobs (all plain keyword options, e.g. ``get_task("synthetic", max_value=20,
steps=2)``): ``min_value``/``max_value`` (or ``num_range=(a, b)``), ``steps`` (an int or a
``(lo, hi)`` range), ``ops`` (a string over ``"+-*"``), ``max_factor`` (largest multiplier),
``distractors`` (number of irrelevant sentences; ``True`` = 1) and ``style`` (``"word"``,
``"expression"``: "What is (7 + 3) - 4?", or ``"inverse"``, below). Subtraction always leaves at
least one.

``style="inverse"``: one subtraction ``a - b`` (``2 <= a <= max_value``) or division
``(q·b) ÷ b`` (``2 <= q, b <= max_factor``), asked as "What is 37 - 9?" / "What is 56 ÷ 7?".
This is the family where **checking is easier than solving** for the embedded model: an answer
is checked with the inverse operation (``28 + 9 = 37``, ``8 × 7 = 56``), and SmolLM2-135M-Instruct
adds and multiplies small numbers far better than it subtracts and divides (measured greedy on
64 questions each: single-digit addition 0.91 and multiplication 0.92, against subtraction
``a <= 40`` 0.24 and division 0.33; ``experiments/probe_verification.py``).
``split_buckets`` sets how the ten hash buckets are shared by test/validation/train
(default ``(2, 1, 7)``).

Determinism and disjoint splits: candidate ``i`` is drawn from ``Random(f"{seed}:{i}")``, and
every split scans the same candidate stream, keeping the candidates whose *core* problem
(the text without distractors) hashes into that split's bucket (test 20 %, validation 10 %,
train 70 %). So splits never share a core problem, for any seed, and the same options always
give the same questions.

The defaults (numbers 1-9, 1-2 steps of + and -) suit the tiny default model
(SmolLM2-135M-Instruct), which already gets two-digit sums wrong; calibrate with the knobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from malt_jax.tasks.base import Example, LoadResult, Task
from malt_jax.tasks.grading import extract_number, grade_number, normalize_number
from malt_jax.tasks.prompts import resolve_prompts

log = logging.getLogger(__name__)

NAMES = ("Mia", "Tom", "Ana", "Ben", "Lily", "Sam", "Zoe", "Max", "Emma", "Leo", "Nora", "Jack")
ITEMS = (
    "apple",
    "marble",
    "sticker",
    "pencil",
    "cookie",
    "book",
    "coin",
    "card",
    "shell",
    "balloon",
    "toy car",
    "flower",
)  # plural: + "s"
ADD = ("{name} buys {b} more {item}.", "{name} finds {b} more {item}.", "{friend} gives {name} {b} more {item}.")
SUB = ("{name} gives {b} {item} to {friend}.", "{name} loses {b} {item}.", "{name} sells {b} {item}.")
MUL = (
    "Then the number of {item} {name} has becomes {b} times as large.",
    "{name} then gets more {item} until there are {b} times as many as before.",
)
DISTRACT = (
    "{friend} has {c} {other}.",
    "{name} is {c} years old.",
    "The shop is {c} minutes away.",
    "{friend} reads {c} pages of a book.",
)
SPLIT_BUCKETS = (2, 1, 7)  # test, validation, train (of 10 hash buckets)
SYMBOLS = {"+": "+", "-": "-", "*": "×", "/": "÷"}
STYLES = ("word", "expression", "inverse")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A generated problem: core text (no distractors), full text, answer, expression."""

    core: str
    text: str
    answer: int
    expression: str
    steps: int


def _as_range(value: int | Sequence[int], what: str) -> tuple[int, int]:
    try:
        lo, hi = (value, value) if isinstance(value, int) else tuple(value)
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a (lo, hi) pair of ints, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{what} must satisfy 1 <= lo <= hi, got {value!r}")
    return int(lo), int(hi)


class SyntheticArithmetic(Task):
    """Procedural arithmetic word problems with exact integer answers."""

    name = "synthetic"

    def __init__(
        self,
        seed: int = 0,
        min_value: int = 1,
        max_value: int = 9,
        num_range: Sequence[int] | None = None,
        steps: int | Sequence[int] = (1, 2),
        ops: str | None = None,
        max_factor: int = 5,
        distractors: int | bool = 0,
        style: str = "word",
        train_size: int = 2000,
        test_size: int = 500,
        validation_size: int = 500,
        split_buckets: Sequence[int] = SPLIT_BUCKETS,
        prompts: Any = None,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        lo, hi = (min_value, max_value) if num_range is None else tuple(num_range)
        self.num_range = _as_range((lo, hi), "num_range" if num_range is not None else "min_value/max_value")
        self.steps = _as_range(steps, "steps")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        allowed = "-/" if style == "inverse" else "+-*"
        ops = ops if ops is not None else ("-/" if style == "inverse" else "+-")
        if not ops or set(ops) - set(allowed):
            raise ValueError(f"ops must be a non-empty string over {allowed!r} for style {style!r}, got {ops!r}")
        self.ops = ops
        self.max_factor = max(2, int(max_factor))
        self.distractors = int(distractors)
        self.style = style
        try:
            counts = [int(c) for c in split_buckets]
        except (TypeError, ValueError):
            counts = []
        if len(counts) != 3 or min(counts) < 1 or sum(counts) != 10:
            raise ValueError(
                f"split_buckets must be three counts >= 1 (test, validation, train) summing to 10, "
                f"got {split_buckets!r}"
            )
        t, v, _ = counts
        self.buckets = {"test": range(0, t), "validation": range(t, t + v), "train": range(t + v, 10)}
        self.sizes = {"train": train_size, "test": test_size, "validation": validation_size}
        self.prompts = resolve_prompts("synthetic", prompts)

    def _load(self, split: str) -> LoadResult:
        if split not in self.sizes:
            raise ValueError(f"unknown split {split!r}; synthetic has {sorted(self.sizes)}")
        want, bucket = self.sizes[split], self.buckets[split]
        examples: list[Example] = []
        seen: set[str] = set()
        for i in range(50 * want + 1000):
            if len(examples) >= want:
                break
            problem = self.generate(i)
            if problem.core in seen or _bucket(problem.core) not in bucket:
                continue
            seen.add(problem.core)
            examples.append(
                Example(
                    id=f"synthetic-{split}-{len(examples)}",
                    question=problem.text,
                    answer=str(problem.answer),
                    meta={"expression": problem.expression, "steps": problem.steps, "candidate": i},
                )
            )
        if len(examples) < want:
            log.warning(
                "synthetic/%s: only %d distinct problems for these options (asked %d)", split, len(examples), want
            )
        return LoadResult(examples=examples)

    def generate(self, index: int) -> Problem:
        """Candidate problem number ``index`` (a pure function of the options and seed)."""
        rng = random.Random(f"malt-synthetic:{self.seed}:{index}")
        if self.style == "inverse":
            return self._inverse(rng)
        name, friend = rng.sample(NAMES, 2)
        item, other = rng.sample(ITEMS, 2)
        value = rng.randint(*self.num_range)
        expression = str(value)
        sentences = [f"{name} has {value} {_noun(item, value)}."]
        steps = rng.randint(*self.steps)
        for _ in range(steps):
            op = self._pick_op(rng, value)
            b = self._operand(rng, op, value)
            value = {"+": value + b, "-": value - b, "*": value * b}[op]
            if op == "*" and ("+" in expression or " - " in expression):
                expression = f"({expression})"
            expression = f"{expression} {SYMBOLS[op]} {b}"
            template = rng.choice({"+": ADD, "-": SUB, "*": MUL}[op])
            sentences.append(template.format(name=name, friend=friend, item=_noun(item, b), b=b))
        question = f"How many {item}s does {name} have now?"
        if self.style == "expression":
            core = text = f"What is {expression}?"
        else:
            core = " ".join([*sentences, question])
            for _ in range(self.distractors):
                c = rng.randint(*self.num_range)
                d = rng.choice(DISTRACT).format(name=name, friend=friend, other=_noun(other, c), c=c)
                sentences.insert(rng.randint(1, len(sentences)), d)
            text = " ".join([*sentences, question])
        return Problem(core=core, text=text, answer=value, expression=expression, steps=steps)

    def _inverse(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        if op == "-":
            a = rng.randint(max(2, self.num_range[0] + 1), max(2, self.num_range[1]))
            b = rng.randint(1, a - 1)
            answer = a - b
        else:
            answer, b = rng.randint(2, self.max_factor), rng.randint(2, self.max_factor)
            a = answer * b
        expression = f"{a} {SYMBOLS[op]} {b}"
        text = f"What is {expression}?"
        return Problem(core=text, text=text, answer=answer, expression=expression, steps=1)

    def _pick_op(self, rng: random.Random, value: int) -> str:
        ops = [op for op in self.ops if op != "-" or value > self.num_range[0]]
        return rng.choice(ops or ["+"])

    def _operand(self, rng: random.Random, op: str, value: int) -> int:
        lo, hi = self.num_range
        if op == "-":  # keep at least one left
            return rng.randint(lo, min(hi, value - 1))
        if op == "*":
            return rng.randint(2, self.max_factor)
        return rng.randint(lo, hi)

    def extract(self, text: str) -> str | None:
        return extract_number(text)

    def answer_key(self, text: str, example: Example) -> str | None:
        """The extracted number in canonical decimal form ("0.50", ".5" -> "0.5")."""
        value = extract_number(text)
        return normalize_number(value) if value is not None else None

    def grade(self, text: str, gold: str) -> int:
        return grade_number(text, gold)


def _noun(item: str, count: int) -> str:
    return item if count == 1 else item + "s"


def _bucket(core: str) -> int:
    """A stable bucket 0..9 for a core problem text."""
    return int.from_bytes(hashlib.sha256(core.encode()).digest()[:8], "big") % 10
