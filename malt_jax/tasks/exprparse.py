"""A small, safe parser for plain infix math (the output of ``latex.latex_to_infix``).

Nothing here (or in the sympy worker) ever calls ``eval``/``exec`` or sympy's ``parse_expr``
on model text: strings are tokenized against a strict whitelist and parsed by recursive
descent into a tuple AST, whose size and nesting depth are capped. Two back ends consume the
AST: exact ``Fraction`` arithmetic (in-process, with bounded number sizes) and sympy (only in
the sandboxed worker process, see ``symbolic.py``).

Grammar (``^`` is right-associative, juxtaposition is multiplication)::

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary | unary)*
    unary   := ('+' | '-') unary | power
    power   := primary ('^' unary)?
    primary := NUMBER | NAME | FUNC '(' expr ')' | '(' expr ')'
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

FUNCTIONS = ("sqrt", "sin", "cos", "tan", "log", "ln", "exp")
CONSTANTS = ("pi",)
MAX_TOKENS = 400
MAX_DEPTH = 40
MAX_NUMBER_CHARS = 40
MAX_BITS = 4096  # Fraction numerators/denominators larger than this are "too big"
MAX_EXPONENT = 64

Node = tuple[Any, ...]
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([A-Za-z]+)|([-+*/^()]))")


class ParseError(ValueError):
    """Text outside the whitelisted grammar (or too large / too deep)."""


class TooBig(ArithmeticError):
    """Exact evaluation would exceed the size bounds."""


class Unsupported(ValueError):
    """The expression needs symbolic math (symbols, sqrt, pi, ...)."""


def tokenize(text: str) -> list[tuple[str, str]]:
    """``(kind, value)`` tokens; letters split into single-letter names except known words."""
    tokens: list[tuple[str, str]] = []
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r}")
        pos = m.end()
        num, word, op = m.groups()
        if num is not None:
            if len(num) > MAX_NUMBER_CHARS:
                raise ParseError("number too long")
            tokens.append(("num", num))
        elif word is not None:
            tokens.extend(_split_word(word))
        else:
            tokens.append(("op", op))
        if len(tokens) > MAX_TOKENS:
            raise ParseError("expression too long")
    return tokens


def _split_word(word: str) -> list[tuple[str, str]]:
    """``"sqrt"`` -> func, ``"pi"`` -> const, ``"xy"`` -> names x, y (implicit product)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(word):
        for known in (*FUNCTIONS, *CONSTANTS):
            if word.startswith(known, i):
                out.append(("func" if known in FUNCTIONS else "const", known))
                i += len(known)
                break
        else:
            out.append(("name", word[i]))
            i += 1
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of expression")
        self.pos += 1
        return tok

    def expect(self, value: str) -> None:
        if self.take() != ("op", value):
            raise ParseError(f"expected {value!r}")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("expression nested too deeply")

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            node = ("add" if op == "+" else "sub", node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in (("op", "*"), ("op", "/")):
                self.take()
                node = ("mul" if tok[1] == "*" else "div", node, self.unary())
            elif tok is not None and (tok[0] != "op" or tok[1] == "("):
                node = ("mul", node, self.unary())
            else:
                return node

    def unary(self) -> Node:
        self.nest()
        tok = self.peek()
        if tok in (("op", "-"), ("op", "+")):
            self.take()
            operand = self.unary()
            node = ("neg", operand) if tok[1] == "-" else operand
        else:
            node = self.power()
        self.depth -= 1
        return node

    def power(self) -> Node:
        base = self.primary()
        if self.peek() == ("op", "^"):
            self.take()
            return ("pow", base, self.unary())
        return base

    def primary(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return ("num", value)
        if kind in ("name", "const"):
            return (kind, value)
        if kind == "func":
            self.expect("(")
            arg = self.expr()
            self.expect(")")
            return ("func", value, arg)
        if value == "(":
            node = self.expr()
            self.expect(")")
            return node
        raise ParseError(f"unexpected {value!r}")


def parse(text: str) -> Node:
    """Parse whitelisted infix text into a tuple AST (raises ``ParseError``)."""
    tokens = tokenize(text)
    if not tokens:
        raise ParseError("empty expression")
    parser = _Parser(tokens)
    node = parser.expr()
    if parser.peek() is not None:
        raise ParseError(f"unexpected {parser.peek()[1]!r}")  # type: ignore[index]
    return node


def _postorder(node: Node) -> list[Node]:
    """The AST's nodes, children before parents (iterative: chains of up to ``MAX_TOKENS``
    operations build trees hundreds of levels deep, too deep for plain recursion)."""
    out: list[Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(child for child in n[1:] if isinstance(child, tuple))
    out.reverse()
    return out


def is_numeric(node: Node) -> bool:
    """True when the AST has no names, constants or functions."""
    return not any(n[0] in ("name", "const", "func") for n in _postorder(node))


def _check(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise TooBig("number too large")
    return x


def evaluate_exact(node: Node) -> Fraction:
    """Exact rational value of a numeric AST (``Unsupported``/``TooBig``/``ZeroDivisionError``)."""
    return _result(_exact_values(node), node)


_Value = Fraction | ArithmeticError | ValueError


def _result(values: dict[int, _Value], node: Node) -> Fraction:
    value = values[id(node)]
    if isinstance(value, Fraction):
        return value
    raise value


def _exact_values(root: Node) -> dict[int, _Value]:
    """The exact value of every subtree of ``root`` (keyed by ``id``), or the error evaluating
    it raises, in one bottom-up pass (linear in the tree size, no recursion). An operation
    reports its left operand's error first, then its right operand's."""
    values: dict[int, _Value] = {}
    for node in _postorder(root):
        kind = node[0]
        try:
            if kind == "num":
                value = Fraction(node[1])
            elif kind in ("name", "const", "func"):
                raise Unsupported(kind)
            elif kind == "neg":
                value = -_result(values, node[1])
            else:
                a, b = _result(values, node[1]), _result(values, node[2])
                value = _apply(kind, a, b)
        except (ArithmeticError, ValueError) as e:  # Unsupported, TooBig, ZeroDivisionError
            values[id(node)] = e.with_traceback(None)
        else:
            values[id(node)] = value
    return values


def _apply(kind: str, a: Fraction, b: Fraction) -> Fraction:
    if kind == "add":
        return _check(a + b)
    if kind == "sub":
        return _check(a - b)
    if kind == "mul":
        return _check(a * b)
    if kind == "div":
        return _check(a / b)
    return _power(a, b)


def _power(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1:
        raise Unsupported("non-integer exponent")
    bits = max(abs(a.numerator).bit_length(), a.denominator.bit_length())
    if abs(b) > MAX_EXPONENT or bits * abs(b) > MAX_BITS:
        raise TooBig("power too large")
    return _check(a ** int(b))


def check_bounded(node: Node) -> None:
    """Raise ``TooBig`` if any numeric part is too large or any constant exponent exceeds
    ``MAX_EXPONENT`` (so sympy is never asked to expand ``10^(10^10)`` or ``(x+1)^999``).

    One pass over the tree: every numeric subtree is evaluated once (bottom-up), not once per
    ancestor."""
    values = _exact_values(node)
    for n in _postorder(node):
        value = values[id(n)]
        if isinstance(value, TooBig):  # a numeric subtree too large to evaluate
            raise value
        if n[0] == "pow":
            exponent = values[id(n[2])]
            if isinstance(exponent, TooBig):
                raise exponent
            if isinstance(exponent, Fraction) and abs(exponent) > MAX_EXPONENT:
                raise TooBig("exponent too large")


def to_sympy(node: Node, sympy: Any) -> Any:
    """Build a sympy expression from the AST (run only inside the sandboxed worker)."""
    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1])
    if kind == "name":
        return sympy.Symbol(node[1])
    if kind == "const":
        return sympy.pi
    if kind == "func":
        name: str = node[1]
        fn = {"ln": "log"}.get(name, name)
        return getattr(sympy, fn)(to_sympy(node[2], sympy))
    if kind == "neg":
        return -to_sympy(node[1], sympy)
    a, b = to_sympy(node[1], sympy), to_sympy(node[2], sympy)
    ops = {
        "add": lambda: a + b,
        "sub": lambda: a - b,
        "mul": lambda: a * b,
        "div": lambda: a / b,
        "pow": lambda: a**b,
    }
    return ops[kind]()
