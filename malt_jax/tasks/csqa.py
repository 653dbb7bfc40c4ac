"""CommonsenseQA (Talmor et al. 2019): 5-way multiple choice, gold = the answer letter.

Two layouts are read (the layout is detected per row):

* original jsonl: ``{"answerKey", "id", "question": {"question_concept", "stem",
  "choices": [{"label": "A", "text": ...}, ...]}}`` (``train_rand_split.jsonl``,
  ``dev_rand_split.jsonl``; ``dev`` is the ``validation`` split);
* flattened Hugging Face layout: ``id``, ``question``, ``question_concept``,
  ``choices: {"label": [...], "text": [...]}``, ``answerKey``.

``Example.question`` is the stem followed by one ``A) text`` line per choice;
``Example.meta["choices"]`` maps letters to choice texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from malt_jax.tasks.base import Example, LoadResult, Task, check_on_error
from malt_jax.tasks.dataio import RowError, read_jsonl, require, resolve_split_file
from malt_jax.tasks.grading import (
    _choice_by_text,
    cap_text,
    extract_choice,
    final_answer_segment,
    grade_choice,
)
from malt_jax.tasks.prompts import resolve_prompts

LETTERS = "ABCDE"


def _original_choices(question: Mapping[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    stem = require(question, "stem")
    choices = require(question, "choices", list)
    pairs = []
    for c in choices:
        pairs.append((require(c, "label"), require(c, "text")))
    return stem, str(question.get("question_concept", "")), pairs


def _hf_choices(row: Mapping[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    stem = require(row, "question")
    choices = require(row, "choices", Mapping)
    labels, texts = require(choices, "label", list), require(choices, "text", list)
    if len(labels) != len(texts):
        raise RowError("choices.label and choices.text differ in length")
    if not all(isinstance(x, str) for x in [*labels, *texts]):
        raise RowError("choices.label/text must be strings")
    return stem, str(row.get("question_concept", "")), list(zip(labels, texts))


def format_question(stem: str, choices: list[tuple[str, str]]) -> str:
    """Stem plus one ``A) text`` line per choice."""
    return "\n".join([stem.strip(), *(f"{label}) {text}" for label, text in choices)])


def parse_row(row: Mapping[str, Any], row_id: str) -> Example:
    """One CSQA row (either layout) -> ``Example`` with the gold letter."""
    if isinstance(row, Mapping) and isinstance(row.get("question"), Mapping):
        stem, concept, choices = _original_choices(row["question"])
    else:
        stem, concept, choices = _hf_choices(row)
    if not choices:
        raise RowError("no choices")
    gold = require(row, "answerKey").strip().upper()
    labels = [label for label, _ in choices]
    if gold not in labels:
        raise RowError(f"answerKey {gold!r} is not one of the choice labels {labels}")
    return Example(
        id=str(row.get("id", row_id)),
        question=format_question(stem, choices),
        answer=gold,
        meta={"choices": dict(choices), "concept": concept, "stem": stem.strip()},
    )


class CSQA(Task):
    """CommonsenseQA from local jsonl (original or flattened HF layout)."""

    name = "csqa"

    def __init__(
        self, path: str | Path | None = None, on_error: str = "raise", prompts: Any = None, letters: str = LETTERS
    ) -> None:
        super().__init__()
        self.path = Path(path) if path else None
        self.on_error = check_on_error(on_error)
        self.prompts = resolve_prompts("csqa", prompts)
        self.letters = letters

    def _load(self, split: str) -> LoadResult:
        if self.path is None:
            raise ValueError("csqa needs path= (a jsonl file or a directory of split files)")
        file = resolve_split_file(self.path, split, (".jsonl",))
        return read_jsonl(file, parse_row, self.on_error)

    def extract(self, text: str) -> str | None:
        return extract_choice(text, self.letters)

    def grade(self, text: str, gold: str) -> int:
        return grade_choice(text, gold, self.letters)

    def grade_example(self, text: str, example: Example) -> int:
        """Like ``grade``, also accepting the exact text of a choice as the final answer."""
        choices = example.meta.get("choices") or None
        letters = "".join(choices) if choices else self.letters
        return grade_choice(text, example.answer, letters, choices)

    def answer_key(self, text: str, example: Example) -> str | None:
        """The chosen letter, named by letter or by the exact text of one of the example's
        choices ("Final Answer: bank" -> "B" when choice B is "bank"), as ``grade_example``."""
        choices = example.meta.get("choices") or None
        letters = "".join(choices) if choices else self.letters
        found = extract_choice(text, letters)
        if found is None and choices:
            found = _choice_by_text(text, choices)
        return found

    def has_explicit_answer(self, text: str, example: Example | None = None) -> bool:
        """A ``Final Answer:`` line naming a valid choice (by letter, or by the text of one of
        ``example``'s choices); ``\\boxed{}`` does not count (the CSQA grader never reads it)."""
        seg = final_answer_segment(cap_text(text))
        if not seg:
            return False
        return self._segment_answer(seg, example) is not None
