"""Core types of the tasks layer: ``Example``, ``Task``, ``DataError`` and seeded subsets.

Every benchmark (GSM8K, MATH, CommonsenseQA, the embedded synthetic arithmetic) is a ``Task``:
it loads ``Example`` rows for a split, extracts the final answer from model text and grades
it against the gold answer. The pipeline only talks to this interface (see ``registry.get_task``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from malt_jax.tasks.prompts import RolePrompts

log = logging.getLogger(__name__)

ON_ERROR_MODES = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class Example:
    """One question with its canonical gold answer.

    ``question`` is the full text shown to the model (for CSQA: the stem plus lettered
    choices); ``answer`` is the canonical gold (``"72"``, ``"\\frac{1}{2}"``, ``"A"``).
    Hashable by (id, question, answer); ``meta`` holds extras (solution, choices, ...).
    """

    id: str
    question: str
    answer: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


class DataError(ValueError):
    """A malformed data row; the message names the file and (1-based) line."""

    def __init__(self, path: object, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass
class LoadResult:
    """Examples read from a source plus what was skipped (``on_error="skip"``)."""

    examples: list[Example]
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)  # first few messages

    MAX_ERRORS: ClassVar[int] = 20

    def add_error(self, err: DataError) -> None:
        """Count a skipped row, remembering the first few messages."""
        self.skipped += 1
        if len(self.errors) < self.MAX_ERRORS:
            self.errors.append(str(err))


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` mode (``"raise"`` or ``"skip"``)."""
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    return on_error


class Task(abc.ABC):
    """A benchmark: data loading, answer extraction, grading and role prompts.

    Subclasses set ``name`` and ``prompts`` and implement ``_load``, ``extract`` and ``grade``.
    ``load`` records how many malformed rows were skipped per split in ``skipped``.
    """

    name: ClassVar[str] = ""
    prompts: RolePrompts
    #: Whether training rewards (``pipeline.grade_leaves``) also need an explicit final answer
    #: in a completion that stopped by itself; False only for tasks whose answer is not
    #: written in the text (e.g. the test suite's parity task).
    strict_rewards: ClassVar[bool] = True

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}
        self.errors: dict[str, list[str]] = {}

    def load(self, split: str) -> list[Example]:
        """Examples of ``split`` (``"train"``, ``"test"``, ``"validation"``), in a fixed order."""
        result = self._load(split)
        self.skipped[split] = result.skipped
        self.errors[split] = result.errors
        if result.skipped:
            log.warning(
                "%s/%s: skipped %d malformed rows (first: %s)",
                self.name,
                split,
                result.skipped,
                result.errors[0] if result.errors else "?",
            )
        return result.examples

    @abc.abstractmethod
    def _load(self, split: str) -> LoadResult:
        """Read the split; malformed rows raise ``DataError`` or are skipped and counted."""

    @abc.abstractmethod
    def extract(self, text: str) -> str | None:
        """The final answer in model text (prefers a ``Final Answer:`` line), or None."""

    @abc.abstractmethod
    def grade(self, text: str, gold: str) -> int:
        """1 if the model text's final answer matches ``gold``, else 0. Never raises."""

    def grade_example(self, text: str, example: Example) -> int:
        """Grade against an ``Example``; tasks may use ``example.meta`` (CSQA choice texts)."""
        return self.grade(text, example.answer)

    def answer_key(self, text: str, example: Example) -> str | None:
        """Canonical key of the final answer in ``text`` (None when there is none).

        Texts whose answers the grader considers equal get the same key, so majority votes
        count them together. Default: ``extract``; tasks whose grader is looser override it.
        """
        return self.extract(text)

    def grade_key(self, key: str, example: Example) -> int:
        """Grade an answer *key* (an :meth:`answer_key` value, e.g. a majority vote's winner)
        against ``example``: 1 if the answer it names is right, else 0.

        Default: :meth:`grade_example` of the canonical text ``Final Answer: <key>``, so the voted
        answer itself is graded rather than some pass that had it. Tasks whose keys are not
        answers a text can state (e.g. an answer read off the text's form) override it.
        """
        return self.grade_example(f"Final Answer: {key}", example)

    def has_explicit_answer(self, text: str, example: Example | None = None) -> bool:
        """True iff ``text`` states its answer explicitly: a ``Final Answer:`` line whose segment
        holds an extractable answer, or a ``\\boxed{}`` holding one (a "last number in the
        text" fallback is not explicit). ``example`` lets tasks check it against the example
        (CSQA: the line must name one of the example's choices, by letter or by text).
        """
        from malt_jax.tasks.grading import cap_text, final_answer_segment
        from malt_jax.tasks.latex import last_boxed

        text = cap_text(text)
        seg = final_answer_segment(text)
        if seg and self._segment_answer(seg, example) is not None:
            return True
        boxed = last_boxed(text)
        if not boxed or not boxed.strip():
            return False
        return self._segment_answer(boxed.strip(), example) is not None

    def _segment_answer(self, segment: str, example: Example | None) -> str | None:
        """The answer held by one answer segment, read as a lone ``Final Answer:`` line."""
        line = f"Final Answer: {segment}"
        return self.extract(line) if example is None else self.answer_key(line, example)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def question_key(question: str) -> str:
    """The form under which two questions count as the same for train/eval overlap: Unicode
    NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", question).casefold()).strip()


def split_examples(
    examples: Sequence[Example], num_train: int, num_eval: int | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic, disjoint train/eval subsets of ``examples`` chosen by ``seed``.

    The same (examples, sizes, seed) always gives the same subsets; different seeds give
    different ones. ``num_eval=None`` takes every example not used for training. Subsets are
    disjoint by position, and also by question text (duplicated questions never straddle, nor do
    questions that differ only in case or whitespace: :func:`question_key`).
    """
    if num_train < 0 or (num_eval is not None and num_eval < 0):
        raise ValueError(f"sizes must be >= 0, got num_train={num_train}, num_eval={num_eval}")
    order = list(range(len(examples)))
    random.Random(f"split_examples:{seed}").shuffle(order)
    train = [examples[i] for i in order[:num_train]]
    if len(train) < num_train:
        raise ValueError(f"num_train={num_train} > {len(examples)} available examples")
    seen = {question_key(ex.question) for ex in train}
    rest = [examples[i] for i in order[num_train:] if question_key(examples[i].question) not in seen]
    if num_eval is None:
        return train, rest
    if num_eval > len(rest):
        raise ValueError(f"num_train={num_train} + num_eval={num_eval} > {len(examples)} available examples")
    return train, rest[:num_eval]


def train_eval_sets(
    task: Task,
    num_train: int,
    num_eval: int | None,
    seed: int,
    train_split: str = "train",
    eval_split: str = "test",
) -> tuple[list[Example], list[Example]]:
    """Seeded train/eval subsets of a task.

    When both splits load the same rows (a single file or a path without split files), the
    pool is divided with ``split_examples``; otherwise each split is subsampled and eval
    questions that also occur in the training subset (up to case and whitespace,
    :func:`question_key`) are dropped.
    """
    train_pool = task.load(train_split)
    eval_pool = task.load(eval_split)
    if [e.id for e in train_pool] == [e.id for e in eval_pool]:
        return split_examples(train_pool, num_train, num_eval, seed)
    train, _ = split_examples(train_pool, num_train, 0, seed)
    seen = {question_key(e.question) for e in train}
    eval_pool = [e for e in eval_pool if question_key(e.question) not in seen]
    _, evals = split_examples(eval_pool, 0, num_eval, seed)
    return train, evals
