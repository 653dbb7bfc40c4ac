"""Text corpora for pretraining (``malt-jax pretrain``): a small protocol and a registry.

A corpus is any object with a ``name`` and ``documents(split, start, count)``, which returns the
documents ``start .. start + count - 1`` of ``split`` (``"train"`` or ``"validation"``). The
documents must be a pure function of (the corpus's options, ``split``, index): pretraining reads
the documents of step ``s`` by index, so the data order is a function of the step alone and a
resumed run sees exactly the documents an uninterrupted one would. Every index ``>= 0`` is
valid (a finite corpus wraps around, in whatever fixed order it likes).

Corpora are looked up by name with :func:`get_corpus`: a name registered with
:func:`register_corpus` (the factory may be given as a ``"package.module:attr"`` string, imported
on first use), or a ``"package.module:attr"`` name itself. The built-in ``"arith"`` corpus
(lines like ``12+7=19``) needs no data and serves the tests; corpora defined at the ``tasks``
level (which this layer does not import) are registered by a higher layer or named by path.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Corpus", "ArithCorpus", "CORPORA", "SPLITS", "get_corpus", "register_corpus", "corpus_names"]

SPLITS = ("train", "validation")


@runtime_checkable
class Corpus(Protocol):
    """What pretraining reads: documents by (split, index), deterministic."""

    name: str

    def documents(self, split: str, start: int, count: int) -> list[str]:
        """Documents ``start .. start + count - 1`` of ``split``."""
        ...


def _check_range(split: str, start: int, count: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"corpus split must be one of {', '.join(SPLITS)}, got {split!r}")
    if start < 0 or count < 0:
        raise ValueError(f"corpus documents: start and count must be >= 0, got start={start}, count={count}")


class ArithCorpus:
    """Lines of integer arithmetic, ``"12+7=19"``, ``lines`` equations per document, each document
    seeded by (``seed``, split, index). Operands lie in ``[0, max_value]``; operators ``+ - *``."""

    name = "arith"

    def __init__(self, seed: int = 0, max_value: int = 99, lines: int = 4, ops: str = "+-*") -> None:
        for key, value, lo in (("seed", seed, 0), ("max_value", max_value, 1), ("lines", lines, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"corpus.options.{key}: expected an int >= {lo}, got {value!r}")
        if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
            raise ValueError(f"corpus.options.ops: expected some of '+-*', got {ops!r}")
        self.seed, self.max_value, self.lines, self.ops = seed, max_value, lines, ops

    def _document(self, split: str, index: int) -> str:
        rng = random.Random(f"arith/{self.seed}/{split}/{index}")
        out = []
        for _ in range(self.lines):
            a, b = rng.randint(0, self.max_value), rng.randint(0, self.max_value)
            op = rng.choice(self.ops)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(f"{a}{op}{b}={value}")
        return "\n".join(out)

    def documents(self, split: str, start: int, count: int) -> list[str]:
        _check_range(split, start, count)
        return [self._document(split, i) for i in range(start, start + count)]


Factory = Callable[..., Any]
CORPORA: dict[str, Factory | str] = {"arith": ArithCorpus, "testbed": "malt_jax.tasks.testbed:testbed_corpus"}


def register_corpus(name: str, factory: Factory | str) -> None:
    """Makes ``get_corpus(name, **options)`` call ``factory(**options)``; ``factory`` may be a
    ``"package.module:attr"`` string, imported when the corpus is first used."""
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"corpus name must be a non-empty string without ':', got {name!r}")
    CORPORA[name] = factory


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def _import(path: str, what: str) -> Factory:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"corpus {what!r}: cannot import {attr!r} from {module!r} ({e})") from None
    if not callable(obj):
        raise ValueError(f"corpus {what!r}: {path} is not callable")
    return obj


def get_corpus(name: str, **options: Any) -> Corpus:
    """The corpus ``name`` (registered, or ``"package.module:attr"``) built with ``options``."""
    if ":" in name:
        factory: Factory | str = name
    elif name in CORPORA:
        factory = CORPORA[name]
    else:
        raise ValueError(f"corpus.name: unknown corpus {name!r}; registered corpora: {', '.join(corpus_names())}")
    if isinstance(factory, str):
        factory = _import(factory, name)
    try:
        corpus = factory(**options)
    except TypeError as e:
        raise ValueError(f"corpus.options: {name!r} does not take these options ({e})") from None
    if not isinstance(corpus, Corpus):
        raise ValueError(
            f"corpus {name!r}: {factory!r} did not return a Corpus (name + documents(split, start, count))"
        )
    return corpus
