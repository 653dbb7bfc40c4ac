"""Answer extraction and grading for GSM8K/synthetic (numbers), MATH (LaTeX) and CSQA (letters).

Every ``grade_*`` returns 1/0, never raises, and runs in bounded time on any input.

Policy
------
Bounds and safety
  * Only the last ``MAX_TEXT_CHARS`` characters of a model output are read (final answers sit
    at the end); extracted answers longer than ``latex.MAX_ANSWER_CHARS`` are only compared as
    normalised strings. Numbers longer than 40 characters never match.
  * Model text is never passed to ``eval``/``exec``, sympy's ``parse_expr`` or
    ``sympify``: LaTeX is translated by a whitelist converter (``latex.latex_to_infix``) and
    parsed by the small recursive-descent parser in ``exprparse`` (size and depth capped).
    ``parse_latex`` is not used (it needs antlr, and we want one audited code path).
  * Symbolic checks (sympy ``simplify``) run in a separate worker process under a deadline
    (``symbolic_timeout``, default 5 s, one budget shared by all parts of an answer) and an
    address-space cap; overruns count as "not equal" and the worker is restarted. Constant
    exponents above 64 and numbers above 4096 bits are refused before reaching sympy.

Where the answer is taken from (all tasks), first hit wins
  1. the last ``Final Answer:`` line (case-insensitive, markdown ``**`` allowed; if the line is
     empty, the next non-empty line);
  2. ``#### N`` (GSM8K style) / the last ``\\boxed{}`` / ``\\fbox{}``;
  3. the last "the answer is ..." phrase;
  4. numbers only: the last number anywhere in the text.

GSM8K / synthetic (numeric)
  * Within an answer segment the first number is taken, or the first number after the last
    ``=`` ("16 - 3 - 4 = 9" -> 9). Commas as thousands separators, ``$``, ``%``, unit words
    ("5 apples", "18 dollars"), a leading ``+`` and trailing zeros (``18.0``, ``18.50``) are
    ignored; a unicode minus counts as ``-``. A ``-`` right after a digit is subtraction, not
    a sign. Comparison is exact decimal equality ("18.5" != "18").

MATH (LaTeX)
  * Normalisation: ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``,
    ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\left``/``\\right``, spacing commands and all spaces are
    dropped, ``^\\circ``/"degrees", ``\\%``/``%``, ``\\$`` and trailing units
    (``10\\text{ cm}``) are removed, other ``\\text{..}`` is unwrapped, a short left-hand side
    ``x = `` is dropped, ``.5`` -> ``0.5``, thousands separators removed, ``(C)`` -> ``C``.
  * Numbers compare exactly: "1/2", "0.5" and "\\frac{1}{2}" are equal, but "0.33" and
    "\\frac{1}{3}" are not (no tolerance). Percent and degree signs are ignored ("50\\%" = "50").
  * Expressions with symbols, roots or pi are equal when sympy proves ``simplify(a-b) == 0``
    ("2\\sqrt{2}" = "\\sqrt{8}"); decimal approximations of irrationals are not equal.
  * Intervals/tuples: brackets must match exactly ("[1,2)" != "[1,2]") and items compare
    pairwise in order; "(1,2)" also equals the bare list "1,2". Bare comma lists and
    ``\\{..\\}`` sets compare as unordered multisets ("1,-2" = "-2,1").

CSQA (letters)
  * A capital letter from the task's choice letters, taken from the ``Final Answer:`` line
    ("B", "(B)", "B) bank", "**B**"), else the last "answer is (B)" / "answer: B" / "option B"
    phrase, else a one-line reply that starts with a letter. Lower-case letters and letters
    inside words never count. ``grade_choice(..., choices=...)`` also accepts the exact text of
    one choice as the final answer ("Final Answer: bank").
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from malt_jax.tasks import exprparse
from malt_jax.tasks.latex import (
    MAX_ANSWER_CHARS,
    last_boxed,
    latex_to_infix,
    normalize_math,
)
from malt_jax.tasks.symbolic import DEFAULT_TIMEOUT_S, symbolic_equal

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 20_000
MAX_NUMBER_CHARS = 40
MAX_ITEMS = 20

# ----------------------------------------------------------------------------- shared


def cap_text(text: Any) -> str:
    """The last ``MAX_TEXT_CHARS`` characters of ``text`` ('' for non-strings)."""
    return text[-MAX_TEXT_CHARS:] if isinstance(text, str) else ""


_FINAL_RE = re.compile(r"final\s*answer\s*(?:is)?\s*\**\s*[:：]?", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def _last_match(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    """The last of ``matches`` (None when there are none)."""
    last = collections.deque(matches, maxlen=1)
    return last[0] if last else None


def final_answer_segment(text: str) -> str | None:
    """Text after the last ``Final Answer:`` (rest of line, else the next non-empty line)."""
    last = _last_match(_FINAL_RE.finditer(text))
    return _segment_after(text, last.end()) if last else None


def _segment_after(text: str, pos: int) -> str:
    """Rest of the line from ``pos`` (or the next non-empty line), markdown stripped."""
    lines = text[pos:].split("\n", 3)
    for line in lines[:3]:
        line = line.strip().strip("*_#").strip()
        if line:
            return line
    return ""


def _answer_is_segment(text: str) -> str | None:
    last = _last_match(_ANSWER_IS_RE.finditer(text))
    return _segment_after(text, last.end()) if last else None


def never_raises(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a grader so unexpected errors grade 0 (and are logged) instead of raising."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return int(fn(*args, **kwargs))
        except Exception:  # noqa: BLE001 - graders must never take the pipeline down
            log.exception("grader %s failed; grading 0", fn.__name__)
            return 0

    return wrapper


# ----------------------------------------------------------------------------- numbers

_NUMBER_RE = re.compile(r"(?P<sign>[-−+]?)\s?\$?\s?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def _numbers(text: str, reverse: bool = False) -> Iterator[str]:
    """Normalised numbers in ``text``, in order (last first with ``reverse``; see module
    policy). Lazy: callers that want one number only normalise the numbers they look at."""
    matches = _NUMBER_RE.finditer(text)
    for m in reversed(list(matches)) if reverse else matches:
        sign = m.group("sign")
        before = text[m.start() - 1] if m.start() > 0 else " "
        if sign and (before.isalnum() or before in ")]"):
            sign = ""  # "16-3": subtraction, not a negative number
        value = normalize_number(("-" if sign in ("-", "−") else "") + m.group("num"))
        if value is not None:
            yield value


def normalize_number(s: str) -> str | None:
    """Canonical decimal string (``"1,000.50"`` -> ``"1000.5"``), or None if not a number."""
    s = s.strip().replace(",", "").replace("−", "-").replace("$", "").rstrip("%").strip()
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _number_in_segment(segment: str) -> str | None:
    """First number after the last ``=`` if any, else the first number."""
    tail = segment.rsplit("=", 1)[1] if "=" in segment else segment
    return next(_numbers(tail), None) or next(_numbers(segment), None)


def extract_number(text: str) -> str | None:
    """The final numeric answer in model text, normalised, or None."""
    text = cap_text(text)
    segments = [final_answer_segment(text)]
    if "####" in text:
        segments.append(_segment_after(text, text.rfind("####") + 4))
    boxed = last_boxed(text)
    segments += [boxed, _answer_is_segment(text)]
    for seg in segments:
        if seg:
            value = _number_in_segment(seg)
            if value is not None:
                return value
    return next(_numbers(text, reverse=True), None)


def numeric_equal(pred: str | None, gold: str) -> bool:
    """Exact decimal equality after ``normalize_number``."""
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    return a is not None and a == b


@never_raises
def grade_number(text: str, gold: str) -> int:
    """1 if the final number in ``text`` equals ``gold`` (GSM8K / synthetic)."""
    return int(numeric_equal(extract_number(text), gold))


# ----------------------------------------------------------------------------- MATH


# A ``$..$`` span starting at a run of ``$`` (never inside one) with possessive runs: the
# first span is the same as with ``\$+([^$]+)\$+`` but a long run of ``$`` (or text with no
# closing ``$``) is scanned once instead of once per start position (quadratic).
_MATH_DELIMS_RE = re.compile(r"(?<!\$)\$++([^$]++)\$")


def _strip_math_delims(s: str) -> str:
    m = _MATH_DELIMS_RE.search(s)
    if m:
        s = m.group(1)
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s.strip())
    return s.strip().rstrip(".").strip()


def extract_math(text: str) -> str | None:
    """The final LaTeX answer in model text (Final Answer line, ``\\boxed{}``, "answer is")."""
    text = cap_text(text)
    seg = final_answer_segment(text)
    if seg:
        return last_boxed(seg) or _strip_math_delims(seg) or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    seg = _answer_is_segment(text)
    return _strip_math_delims(seg) if seg else None


def math_equal(pred: str | None, gold: str, symbolic: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two LaTeX answers are equivalent under the module policy."""
    if pred is None:
        return False
    p, g = normalize_math(pred), normalize_math(gold)
    if p == g:
        return True
    if not p or not g or max(len(p), len(g)) > MAX_ANSWER_CHARS:
        return False
    deadline = time.monotonic() + timeout if symbolic else None  # one budget per answer
    return _structures_equal(_structure(p), _structure(g), deadline)


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside (), [], {}."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return items


def _structure(s: str) -> tuple[str, list[str]]:
    """(kind, items): kind is "scalar", "set", "list" or the bracket pair like "[)"."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", _split_top_level(s[2:-2])
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and _outer_brackets_match(s):
        inner = _split_top_level(s[1:-1])
        if len(inner) > 1:
            return s[0] + s[-1], inner
    items = _split_top_level(s)
    return ("list", items) if len(items) > 1 else ("scalar", [s])


def _outer_brackets_match(s: str) -> bool:
    """True when the first bracket closes exactly at the last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _structures_equal(a: tuple[str, list[str]], b: tuple[str, list[str]], deadline: float | None) -> bool:
    (ka, ia), (kb, ib) = a, b
    if len(ia) != len(ib) or len(ia) > MAX_ITEMS:
        return False
    eq = lambda x, y: _scalar_equal(x, y, deadline)  # noqa: E731
    if ka == "scalar" or kb == "scalar":
        return ka == kb and eq(ia[0], ib[0])
    unordered = {"set", "list"}
    if ka in unordered and kb in unordered:
        return _multiset_equal(ia, ib, eq)
    if {ka, kb} <= {"()", "list"} or ka == kb:
        return all(eq(x, y) for x, y in zip(ia, ib))
    return False


def _multiset_equal(a: Sequence[str], b: Sequence[str], eq: Callable[[str, str], bool]) -> bool:
    unused = list(b)
    for x in a:
        match = next((i for i, y in enumerate(unused) if eq(x, y)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def _scalar_equal(a: str, b: str, deadline: float | None) -> bool:
    """Equal as strings, exactly as numbers, or (before ``deadline``) symbolically."""
    a, b = normalize_math(a), normalize_math(b)
    if a == b:
        return True
    ia, ib = latex_to_infix(a), latex_to_infix(b)
    if ia is None or ib is None:
        return False
    try:
        na, nb = exprparse.parse(ia), exprparse.parse(ib)
    except exprparse.ParseError:
        return False
    if exprparse.is_numeric(na) and exprparse.is_numeric(nb):
        return _exact_equal(na, nb)
    try:
        exprparse.check_bounded(na)
        exprparse.check_bounded(nb)
    except exprparse.TooBig:
        return False
    if deadline is None or deadline <= time.monotonic():
        return False
    return symbolic_equal(ia, ib, deadline - time.monotonic())


def _exact_equal(a: exprparse.Node, b: exprparse.Node) -> bool:
    try:
        va: Fraction = exprparse.evaluate_exact(a)
        vb: Fraction = exprparse.evaluate_exact(b)
    except (exprparse.TooBig, exprparse.Unsupported, ZeroDivisionError, ValueError):
        return False
    return va == vb


@never_raises
def grade_math(text: str, gold: str, symbolic: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """1 if the final LaTeX answer in ``text`` is equivalent to ``gold`` (MATH)."""
    return int(math_equal(extract_math(text), gold, symbolic, timeout))


# ----------------------------------------------------------------------------- CSQA


def _leading_letter(s: str, letters: str, strict: bool = False) -> str | None:
    """A choice letter opening ``s``; ``strict`` refuses "A word" (could be an article)."""
    end = r"[)\].:,*]|$" if strict else r"[\s)\].:,*]|$"
    m = re.match(rf"^[\s*_(\[]*([{letters}])(?:{end})", s)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=64)
def _answer_phrase_re(letters: str) -> re.Pattern[str]:
    r"""``answer|option|choice [is] [:] [option|choice] [(] LETTER``.

    Every run is possessive: ``\s*`` and ``[:\s]*`` overlap, so with backtracking "answer"
    followed by n spaces and no letter tried O(n^2) splits (30 s at the 20k text cap). Giving
    characters back can never make these matches succeed (what follows each run cannot start
    with a character of the run), so the matches are the same, found in linear time.
    """
    return re.compile(
        rf"(?i:answer|option|choice)\s*+(?:(?i:is)\s*+)?+[:\s]*+(?:(?i:option|choice)\s*+)?+"
        rf"\(?+([{letters}])(?![A-Za-z])"
    )


def _answer_phrase_letter(s: str, letters: str) -> str | None:
    last = _last_match(_answer_phrase_re(letters).finditer(s))
    return last.group(1) if last else None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter in model text, or None (see module policy)."""
    text = cap_text(text)
    letters = re.sub(r"[^A-Z]", "", letters)
    seg = final_answer_segment(text)
    if seg:
        found = _leading_letter(seg, letters) or _answer_phrase_letter(seg, letters)
        if found:
            return found
    found = _answer_phrase_letter(text, letters)
    if found:
        return found
    stripped = text.strip()
    if "\n" not in stripped and len(stripped) <= 200:
        return _leading_letter(stripped, letters, strict=True)
    return None


def _choice_by_text(text: str, choices: Mapping[str, str]) -> str | None:
    """Letter whose choice text is the whole final answer ("Final Answer: bank")."""
    seg = final_answer_segment(cap_text(text))
    if seg is None:
        return None
    key = re.sub(r"[^a-z0-9 ]", "", seg.lower()).strip()
    hits = [k for k, v in choices.items() if re.sub(r"[^a-z0-9 ]", "", v.lower()).strip() == key]
    return hits[0] if len(hits) == 1 else None


@never_raises
def grade_choice(text: str, gold: str, letters: str = "ABCDE", choices: Mapping[str, str] | None = None) -> int:
    """1 if the chosen letter equals ``gold`` (CSQA); ``choices`` maps letters to texts."""
    found = extract_choice(text, letters)
    if found is None and choices:
        found = _choice_by_text(text, choices)
    return int(found is not None and found == gold.strip().upper())
