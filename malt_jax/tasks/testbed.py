"""The testbed task: two-number subtraction whose answers are checked through addition, and the
pretraining corpus that gives a small model generator, verifier and refiner skills of known,
adjustable levels (``malt-jax pretrain experiments/pretrain/testbed.yaml``).

A question is ``a-b`` (``10 <= a <= max_a``, ``1 <= b < a``). The roles, in the pipeline's
separate framing (``tasks/prompts/testbed.yaml``)::

    G  user: 63-27                                   -> Final Answer: 36
    V  user: 63-27 / Final Answer: 46                -> 46+27=73. 73-63=10. Verdict: wrong
    R  user: 63-27 / Final Answer: 46 / 46+27=73. 73-63=10. Verdict: wrong
                                                     -> 46-10=36. Final Answer: 36

Where the generation-verification gap comes from (what the model *learns*, not noise): a
subtraction that borrows (``63-27``: units 3 < 7) is rare in the corpus (``borrow_share``), so a
model trained on it solves the borrowing half of the questions poorly; checking an answer needs
only addition (``c+b``), frequent in the corpus (``add_share``), and the distance of that sum to
``a``, a subtraction that does not borrow for the generator's typical errors (when G forgot the
borrow, ``c+b`` exceeds ``a`` by exactly 10: ``73-63``). The verdict then reads one local fact
(is the distance 0?), and the refiner's correction applies the critique's distance
(``46-10``, again without borrow). So V and R have skills G lacks, learned from the corpus.

Knobs (:class:`TestbedOptions`, all validated, each error names the ``task.options`` key):

* ``max_a``: the largest minuend (2-digit questions by default);
* ``fact_share``: share of corpus items that are plain fact lines (the rest role dialogues);
  ``add_share``: share of additions among fact lines (V's skill); ``borrow_share``: share of
  borrowing problems among the corpus's subtractions and G dialogues (G's skill; in the
  question distribution about 4 in 10 borrow);
* ``role_mix``: shares of G / V / R dialogues;
* ``wrong_rate``: share of the V and R dialogues whose quoted answer is wrong (errors are
  the generator's typical ones: a forgotten borrow, a units or tens digit off by one);
* ``v_detect`` / ``v_false_alarm``: P(the V dialogue's verdict says "wrong" | the answer is
  wrong / right). Its check (sum and distance) is always computed right: only the verdict is set, so
  ``v_detect = v_false_alarm`` teaches a verdict independent of the check (chance), and
  ``1 / 0`` a verdict that follows it;
* ``r_follow``: P(the R dialogue corrects the answer by the critique's distance | the critique
  says wrong); otherwise it repeats the quoted answer;
* ``split_buckets``: how the ten hash buckets of the problems ``(a, b)`` are shared by test /
  validation / train / pretrain. The corpus's subtraction facts and dialogues use only the
  ``pretrain`` buckets (so no evaluation or MALT training question is ever a pretraining fact;
  its sum ``c+b=a`` may be one: that is the skill V checks with).

Determinism: corpus document ``i`` of a split is drawn from ``Random(f"{seed}:{split}:{i}")``;
questions of a split are the problems of its buckets in a seeded order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from malt_jax.tasks.base import Example, LoadResult, Task
from malt_jax.tasks.grading import extract_number, grade_number, normalize_number
from malt_jax.tasks.prompts import RolePrompts, resolve_prompts, separate_messages

__all__ = [
    "TestbedOptions",
    "TestbedTask",
    "TestbedCorpus",
    "testbed_corpus",
    "render_chat",
    "borrows",
    "role_texts",
    "wrong_answers",
]

SPLITS = ("test", "validation", "train", "pretrain")
END = "<|endoftext|>"


class TestbedError(ValueError):
    """An out-of-range testbed option (the message names the ``task.options`` key)."""


@dataclasses.dataclass(frozen=True)
class TestbedOptions:
    max_a: int = 99
    fact_share: float = 0.5
    add_share: float = 0.5
    borrow_share: float = 0.1
    role_mix: tuple[float, float, float] = (0.4, 0.3, 0.3)
    wrong_rate: float = 0.5
    v_detect: float = 0.8
    v_false_alarm: float = 0.2
    r_follow: float = 0.8
    facts_per_item: int = 6
    items_per_document: int = 4
    split_buckets: tuple[int, int, int, int] = (3, 1, 2, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, want: str, got: Any) -> TestbedError:
            return TestbedError(f"task.options.{key}: expected {want}, got {got!r}")

        for key in ("max_a", "facts_per_item", "items_per_document", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, "an int", v)
        if not 10 <= self.max_a <= 9999:
            raise bad("max_a", "10 <= max_a <= 9999", self.max_a)
        if self.facts_per_item < 1 or self.items_per_document < 1:
            key = "facts_per_item" if self.facts_per_item < 1 else "items_per_document"
            raise bad(key, "an int >= 1", getattr(self, key))
        if self.seed < 0:
            raise bad("seed", "an int >= 0", self.seed)
        for key in ("fact_share", "add_share", "borrow_share", "wrong_rate", "v_detect", "v_false_alarm", "r_follow"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise bad(key, "a number in [0, 1]", v)
        mix = self.role_mix
        if (
            not isinstance(mix, (tuple, list))
            or len(mix) != 3
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x for x in mix)
            or sum(mix) <= 0
        ):
            raise bad("role_mix", "three shares >= 0 (G, V, R) with a positive sum", mix)
        b = self.split_buckets
        if (
            not isinstance(b, (tuple, list))
            or len(b) != 4
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b)
            or sum(b) != 10
        ):
            raise bad("split_buckets", "four counts >= 1 (test, validation, train, pretrain) summing to 10", b)
        object.__setattr__(self, "role_mix", tuple(float(x) for x in mix))
        object.__setattr__(self, "split_buckets", tuple(b))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TestbedOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TestbedError(f"task.options.{unknown[0]}: unknown testbed option (known: {', '.join(sorted(known))})")
        return cls(**dict(options))


def borrows(a: int, b: int) -> bool:
    """True iff column subtraction ``a - b`` borrows somewhere."""
    while b:
        if a % 10 < b % 10:
            return True
        a, b = a // 10, b // 10
    return False


def _bucket(a: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{a}-{b}".encode()).digest()[:8], "big") % 10


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML exactly as the testbed tokenizer's chat template renders it (no default system
    turn): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def role_texts(a: int, b: int, answer: int, verdict_wrong: bool, follow: bool) -> dict[str, str]:
    """The three role outputs for question ``a-b`` with G's answer ``answer``: G's reply, V's
    critique and R's reply.

    V checks through the inverse: the sum ``d = answer + b``, then its distance to ``a`` (the
    larger minus the smaller, so ``0`` iff the answer is right), then the verdict, ``wrong`` iff
    ``verdict_wrong`` (the check is always computed right; only the verdict is set by the corpus's
    rates). R, when the critique says wrong and it ``follow``s, moves the answer by the critique's
    distance (down when the sum was too large, up when too small); otherwise it repeats it."""
    d = answer + b
    e = abs(d - a)
    gap = f"{d}-{a}={e}" if d >= a else f"{a}-{d}={e}"
    critique = f"{answer}+{b}={d}. {gap}. Verdict: {'wrong' if verdict_wrong else 'correct'}"
    if verdict_wrong and follow:
        fixed = answer - e if d >= a else answer + e
        step = f"{answer}-{e}={fixed}" if d >= a else f"{answer}+{e}={fixed}"
        refined = f"{step}. Final Answer: {fixed}"
    else:
        refined = f"Final Answer: {answer}"
    return {"generator": f"Final Answer: {answer}", "verifier": critique, "refiner": refined}


def wrong_answers(a: int, b: int) -> list[int]:
    """The wrong answers the corpus shows for ``a-b`` (with repeats as weights): ``c +- 1``,
    ``c +- 10`` and, for a borrowing problem, mostly ``c + 10`` (the forgotten borrow), keeping
    those whose check and correction (:func:`role_texts`) use only subtractions that do not
    borrow."""
    c = a - b
    options = [c + 1, c - 1, c + 10, c - 10] + ([c + 10] * 4 if borrows(a, b) else [])
    out = []
    for x in options:
        if x < 0 or x == c:
            continue
        texts = role_texts(a, b, x, True, True)
        steps = re.findall(r"(\d+)-(\d+)=", texts["verifier"] + " " + texts["refiner"])
        if not any(borrows(int(p), int(q)) for p, q in steps):
            out.append(x)
    return out


class TestbedTask(Task):
    """Subtraction questions ``a-b`` graded exactly; ``corpus()`` is their pretraining corpus."""

    name = "testbed"

    #: the knobs, passed as keyword options (``get_task("testbed", v_detect=0.9)``; the task
    #: registry lists them with its other options)
    option_names: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TestbedOptions))

    def __init__(
        self,
        prompts: RolePrompts | str | Mapping[str, Any] | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
        validation_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.options = TestbedOptions.from_mapping(options)
        for name, size in (("train_size", train_size), ("test_size", test_size), ("validation_size", validation_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                raise TestbedError(f"task.options.{name}: expected an int >= 0, got {size!r}")
        self.prompts = resolve_prompts("testbed", prompts)
        self.sizes = {"train": train_size, "test": test_size, "validation": validation_size, "pretrain": None}
        t, v, tr, _ = self.options.split_buckets
        self.buckets = {
            "test": range(0, t),
            "validation": range(t, t + v),
            "train": range(t + v, t + v + tr),
            "pretrain": range(t + v + tr, 10),
        }
        self._problems: dict[str, list[tuple[int, int]]] = {}

    def problems(self, split: str) -> list[tuple[int, int]]:
        """Every problem ``(a, b)`` of ``split``'s buckets, in a seeded order."""
        if split not in self.buckets:
            raise ValueError(f"testbed: unknown split {split!r} (one of {', '.join(SPLITS)})")
        if split not in self._problems:
            rng = random.Random(f"{self.options.seed}:{split}")
            keep = self.buckets[split]
            ps = [(a, b) for a in range(10, self.options.max_a + 1) for b in range(1, a) if _bucket(a, b) in keep]
            rng.shuffle(ps)
            self._problems[split] = ps
        return self._problems[split]

    def _load(self, split: str) -> LoadResult:
        ps = self.problems(split)
        n = self.sizes.get(split)
        ps = ps if n is None else ps[:n]
        return LoadResult(
            [
                Example(
                    id=f"testbed-{split}-{a}-{b}",
                    question=f"{a}-{b}",
                    answer=str(a - b),
                    meta={"borrow": borrows(a, b)},
                )
                for a, b in ps
            ]
        )

    def extract(self, text: str) -> str | None:
        return extract_number(text)

    def answer_key(self, text: str, example: Example) -> str | None:
        value = self.extract(text)
        return None if value is None else normalize_number(value)

    def grade(self, text: str, gold: str) -> int:
        return grade_number(text, gold)

    def corpus(self) -> TestbedCorpus:
        return TestbedCorpus(self)


class TestbedCorpus:
    """Pretraining documents: fact lines and G / V / R dialogues in ChatML, each document
    ``items_per_document`` items joined by ``<|endoftext|>``. ``documents(split, start, count)``
    is a pure function of (options, split, index): ``split`` is ``"train"`` (problems of the
    pretrain buckets) or ``"validation"`` (problems of the validation buckets, for held-out
    loss)."""

    name = "testbed"

    def __init__(self, task: TestbedTask) -> None:
        self.task = task
        self.opts = task.options
        self.prompts = task.prompts
        self._pools: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}

    def _pool(self, split: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        if split not in self._pools:
            source = {"train": "pretrain", "validation": "validation"}.get(split)
            if source is None:
                raise ValueError(f"testbed corpus: unknown split {split!r} (train or validation)")
            ps = self.task.problems(source)
            self._pools[split] = ([p for p in ps if borrows(*p)], [p for p in ps if not borrows(*p)])
        return self._pools[split]

    def _subtraction(self, rng: random.Random, split: str) -> tuple[int, int]:
        borrow, plain = self._pool(split)
        pool = borrow if (rng.random() < self.opts.borrow_share and borrow) or not plain else plain
        return pool[rng.randrange(len(pool))]

    def _addition(self, rng: random.Random) -> str:
        # the sums V checks with: c + b for any c, b with c + b <= max_a (so every question's check is covered)
        b = rng.randint(1, self.opts.max_a - 1)
        c = rng.randint(1, self.opts.max_a - b) if b < self.opts.max_a else 1
        return f"{c}+{b}={c + b}"

    def _dialogue(self, rng: random.Random, split: str) -> str:
        """One role's dialogue, its prompt built by the pipeline's own ``separate_messages``."""
        p = self.prompts
        a, b = self._subtraction(rng, split)
        q = f"{a}-{b}"
        g, v, _ = self.opts.role_mix
        r = rng.random() * sum(self.opts.role_mix)
        if r < g:
            reply = role_texts(a, b, a - b, False, False)["generator"]
            return render_chat([*separate_messages(p, "generator", q), {"role": "assistant", "content": reply}])
        picks = wrong_answers(a, b)
        wrong = rng.random() < self.opts.wrong_rate and bool(picks)  # (90-81 has no such wrong answer)
        answer = picks[rng.randrange(len(picks))] if wrong else a - b
        says_wrong = rng.random() < (self.opts.v_detect if wrong else self.opts.v_false_alarm)
        texts = role_texts(a, b, answer, says_wrong, rng.random() < self.opts.r_follow)
        g_out, v_out = texts["generator"], p.verifier_prefix + texts["verifier"]
        if r < g + v:
            msgs = separate_messages(p, "verifier", q, g_out)
            return render_chat([*msgs, {"role": "assistant", "content": v_out}])
        msgs = separate_messages(p, "refiner", q, g_out, v_out)
        return render_chat([*msgs, {"role": "assistant", "content": p.refiner_prefix + texts["refiner"]}])

    def _facts(self, rng: random.Random, split: str) -> str:
        lines = []
        for _ in range(self.opts.facts_per_item):
            if rng.random() < self.opts.add_share:
                lines.append(self._addition(rng))
            else:
                a, b = self._subtraction(rng, split)
                lines.append(f"{a}-{b}={a - b}")
        return "\n".join(lines)

    def document(self, split: str, index: int) -> str:
        rng = random.Random(f"{self.opts.seed}:{split}:{index}")
        items = [
            self._facts(rng, split) if rng.random() < self.opts.fact_share else self._dialogue(rng, split)
            for _ in range(self.opts.items_per_document)
        ]
        return END.join(items)

    def documents(self, split: str, start: int, count: int) -> list[str]:
        return [self.document(split, i) for i in range(start, start + count)]


def testbed_corpus(**options: Any) -> TestbedCorpus:
    """The pretraining corpus of ``TestbedTask(**options)`` (``corpus: {name: testbed, options:
    ...}`` in a pretrain config; the same options as the run's ``task.options``)."""
    return TestbedTask(**options).corpus()
