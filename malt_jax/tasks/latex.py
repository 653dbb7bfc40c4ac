"""LaTeX answer handling for MATH: ``\\boxed{}`` extraction, normalisation, LaTeX -> infix.

``latex_to_infix`` only understands a whitelisted subset (numbers, single-letter symbols,
``+ - * / ^``, groups, ``\\frac``, ``\\sqrt``, ``\\pi``, ``\\cdot``, ``\\times``, a few
functions); anything else returns ``None`` and the grader falls back to string comparison.
All loops are linear in the (capped) input and recursion depth is bounded.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 1000  # normalised answers longer than this are only string-compared
MAX_LATEX_DEPTH = 30

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces ok), or None."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    end = matching_brace(text, i)
    return text[i + 1 : end] if end is not None else None


def matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (skips ``\\{``/``\\}``)."""
    depth, i = 0, open_pos
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_REMOVE = [
    r"\\left\.",
    r"\\right\.",
    r"\\left(?![a-z])",
    r"\\right(?![a-z])",
    r"\\displaystyle",
    r"\\!",
    r"\\,",
    r"\\;",
    r"\\:",
    r"\\quad",
    r"\\qquad",
    r"\^\s*\{\s*\\circ\s*\}",
    r"\^\s*\\circ",
    r"\\circ",
    "°",
    r"\\%",
    "%",
    r"\\\$",
    r"\$",
    r"\bdegrees?\b",
]
_REMOVE_RE = re.compile("|".join(_REMOVE))
_UNIT_RE = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|mathit|operatorname)\{([^{}]*)\}")
_LHS_RE = re.compile(r"^[A-Za-z](?:_\{?\w\}?)?\s*=(?!=)")


def normalize_math(s: str) -> str:
    """Canonical string form of a MATH answer (Hendrycks-style ``strip_string`` plus extras)."""
    s = s[: MAX_ANSWER_CHARS * 4].strip().replace("\n", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\ ", " ").replace("{,}", ",")
    s = _UNIT_RE.sub("", s)
    s = _REMOVE_RE.sub("", s)
    for _ in range(5):  # \text{..} unwrapping, innermost first
        s, n = _TEXT_RE.subn(r"\1", s)
        if not n:
            break
    s = s.strip().rstrip(".").strip()
    if s.count("=") == 1 and _LHS_RE.match(s):
        s = s.split("=", 1)[1]
    s = _fix_fracs_and_sqrt(s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<!\d)\.(\d)", r"0.\1", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    return m.group(1) if m else s


def _fix_fracs_and_sqrt(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{x}``, ``\sqrt2`` -> ``\sqrt{2}``."""
    s = re.sub(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9A-Za-z])(?=\s*\{)", r"\\frac{\1}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})\s*([0-9A-Za-z])", r"\\frac\1{\2}", s)
    return re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)


_COMMANDS = {
    "frac": None,
    "sqrt": None,
    "pi": " pi ",
    "cdot": "*",
    "times": "*",
    "div": "/",
    "sin": None,
    "cos": None,
    "tan": None,
    "log": None,
    "ln": None,
    "exp": None,
}
_CONSTANT_COMMANDS = sorted((k for k, v in _COMMANDS.items() if v), key=len, reverse=True)
_ARG_COMMANDS = sorted((k for k, v in _COMMANDS.items() if not v), key=len, reverse=True)
# Argument-free commands may be glued to a letter after spaces were dropped ("\pir^2").
_COMMAND_RE = re.compile(r"\\(?:(" + "|".join(_ARG_COMMANDS) + r")(?![A-Za-z])|(" + "|".join(_CONSTANT_COMMANDS) + "))")
_PLAIN = set("0123456789.+-*/^()")


class _Unsupported(Exception):
    pass


class _Converter:
    """Recursive-descent LaTeX -> infix translation with a depth bound."""

    def __init__(self, s: str) -> None:
        self.s, self.i, self.depth = s, 0, 0

    def seq(self, stop: str | None = None) -> str:
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == stop:
                return "".join(out)
            if c == "{":
                out.append(self.group())
            elif c == "\\":
                out.append(self.command())
            elif c in _PLAIN:
                out.append(c)
                self.i += 1
            elif c.isascii() and c.isalpha():
                out.append(f" {c} ")
                self.i += 1
            else:
                raise _Unsupported(c)
        if stop is not None:
            raise _Unsupported("unclosed group")
        return "".join(out)

    def group(self, opener: str = "{", closer: str = "}") -> str:
        self.depth += 1
        if self.depth > MAX_LATEX_DEPTH:
            raise _Unsupported("too deep")
        self.i += len(opener)
        body = self.seq(stop=closer)
        self.i += 1
        self.depth -= 1
        return f"({body})"

    def arg(self) -> str:
        if self.i >= len(self.s):
            raise _Unsupported("missing argument")
        c = self.s[self.i]
        if c == "{":
            return self.group()
        if c == "\\":
            return f"({self.command()})"
        if c.isascii() and c.isalnum():
            self.i += 1
            return f" {c} "
        raise _Unsupported(c)

    def command(self) -> str:
        m = _COMMAND_RE.match(self.s, self.i)
        if not m:
            raise _Unsupported("unknown command")
        self.i = m.end()
        name = m.group(1) or m.group(2)
        replacement = _COMMANDS[name]
        if replacement is not None:
            return replacement
        if name == "frac":
            return f"({self.arg()}/{self.arg()})"
        if name == "sqrt" and self.s.startswith("[", self.i):
            index = self.group("[", "]")
            return f"(({self.arg()})^(1/{index}))"
        return f" {name}({self.arg()})"


def latex_to_infix(s: str) -> str | None:
    """Whitelisted infix text for a normalised LaTeX scalar, or None when unsupported."""
    if len(s) > MAX_ANSWER_CHARS:
        return None
    try:
        out = _Converter(s).seq()
    except _Unsupported:
        return None
    return out if out.strip() else None
