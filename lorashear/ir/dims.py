"""Symbolic dimensions: a small parser and evaluator for size arithmetic, with no ``eval``.

A `.ir` file is text anyone can write, and its symbolic sizes (``"S+1"``, ``"2*B"``,
``"(S//2)"``) are read back from it, so they are parsed here by a grammar that holds exactly
what lowering produces and nothing more::

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '//') unary)*
    unary  := '-' unary | atom
    atom   := INTEGER | SYMBOL | ('min' | 'max') '(' expr (',' expr)+ ')' | '(' expr ')'

``min``/``max`` are the sizes torch's ``sym_min``/``sym_max`` make (DeepSeek-V3.2's sparse
attention keeps ``min(index_topk, S)`` keys; MPT slices its ALiBi table to ``min(max_seq_len,
S)``); they stay symbolic because their value changes within the sequence lengths a model
accepts. Everything else (``**``, ``/``, other calls, attribute access) is a
:class:`DimSyntaxError` at the
offset of the token where it starts. Sizes are bounded (text length, literal digits, nesting
depth, the magnitude of every intermediate value), so evaluating a hostile size takes
microseconds instead of the hours ``9**9**9**9`` took under ``eval``.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

#: The longest dimension text read (lowering's longest, a few nested floor divisions, is ~40).
MAX_TEXT = 256
#: The deepest nesting of parentheses and unary minus.
MAX_DEPTH = 32
#: Integer literals and every intermediate value stay within +-2**62 (far above any tensor size).
MAX_MAGNITUDE = 1 << 62
_MAX_DIGITS = len(str(MAX_MAGNITUDE))
#: The functions a dimension may call, by name.
_CALLS = {"min": min, "max": max}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<int>\d+)
  | (?P<symbol>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>//|\*\*|[-+*/(),])
""", re.VERBOSE)


class DimSyntaxError(ValueError):
    """A dimension text outside the grammar; ``offset`` is where the offending token starts.

    A ``ValueError`` so that the verifier's existing handling of malformed sizes applies; the
    parser turns it into an :class:`~lorashear.errors.IRParseError` at the token's column."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class DimExpr:
    """A parsed dimension: ``op`` is ``"int"``, ``"sym"``, ``"neg"``, a binary operator, or
    ``"min"``/``"max"`` of two or more arguments."""

    op: str
    value: int | str | None = None
    args: tuple[DimExpr, ...] = ()

    def symbols(self) -> frozenset[str]:
        if self.op == "sym":
            return frozenset((self.value,))
        return frozenset().union(*(a.symbols() for a in self.args))


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) of each token; a character no token starts with is a ``bad``
    token, reported only when the parser reaches it (so the first error is the one named)."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            tokens.append(("bad", text[pos], pos))
            pos += 1
            continue
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group(), pos))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def fail(self, message: str) -> DimSyntaxError:
        tok = self.peek()
        return DimSyntaxError(message, tok[2] if tok else len(self.text))

    def expr(self) -> DimExpr:
        node = self.term()
        while (tok := self.peek()) and tok[1] in ("+", "-"):
            self.i += 1
            node = DimExpr(tok[1], None, (node, self.term()))
        return node

    def term(self) -> DimExpr:
        node = self.unary()
        while (tok := self.peek()) and tok[1] in ("*", "//"):
            self.i += 1
            node = DimExpr(tok[1], None, (node, self.unary()))
        return node

    def unary(self) -> DimExpr:
        tok = self.peek()
        if tok and tok[1] == "-":
            self.i += 1
            with self._nested():
                return DimExpr("neg", None, (self.unary(),))
        return self.atom()

    def atom(self) -> DimExpr:
        tok = self.peek()
        if tok is None:
            raise self.fail("dimension ends where a size was expected")
        kind, text, _ = tok
        if kind == "int":
            if len(text) > _MAX_DIGITS or int(text) > MAX_MAGNITUDE:
                raise self.fail(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is too "
                                "large for a dimension")
            self.i += 1
            return DimExpr("int", int(text))
        if kind == "symbol":
            self.i += 1
            if text in _CALLS and self.peek() and self.peek()[1] == "(":
                return self.call(text)
            return DimExpr("sym", text)
        if text == "(":
            self.i += 1
            with self._nested():
                node = self.expr()
            if not (self.peek() and self.peek()[1] == ")"):
                raise self.fail("expected ')' in a dimension")
            self.i += 1
            return node
        raise self.fail(_unexpected(kind, text))

    def call(self, name: str) -> DimExpr:
        """``min(a, b, ...)``/``max(a, b, ...)``, the name read, at its ``(``."""
        self.i += 1
        args = []
        with self._nested():
            args.append(self.expr())
            while self.peek() and self.peek()[1] == ",":
                self.i += 1
                args.append(self.expr())
        if not (self.peek() and self.peek()[1] == ")"):
            raise self.fail(f"expected ',' or ')' in {name}(...)")
        if len(args) < 2:
            raise self.fail(f"{name}(...) takes at least two sizes")
        self.i += 1
        return DimExpr(name, None, tuple(args))

    @contextlib.contextmanager
    def _nested(self) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"dimension nests deeper than {MAX_DEPTH} levels")
        try:
            yield
        finally:
            self.depth -= 1


def _unexpected(kind: str, token: str) -> str:
    if kind == "bad":
        return f"unexpected character {token!r} in a dimension"
    if token == "**":
        return "'**' is not dimension arithmetic (sizes use + - * // and parentheses)"
    if token == "/":
        return "'/' is not integer arithmetic; a dimension divides with '//'"
    return (f"unexpected {token!r} in a dimension (sizes use integers, names, + - * //, min(..), max(..) "
            "and parentheses)")


@functools.lru_cache(maxsize=4096)
def parse_dim(text: str) -> DimExpr:
    """Parse a symbolic dimension; raise :class:`DimSyntaxError` at the offending token."""
    if len(text) > MAX_TEXT:
        raise DimSyntaxError(f"dimension is longer than {MAX_TEXT} characters", MAX_TEXT)
    parser = _Parser(text)
    node = parser.expr()
    if parser.peek() is not None:
        raise parser.fail(_unexpected(*parser.peek()[:2]))
    return node


def evaluate(node: DimExpr, bindings: dict[str, int]) -> int:
    """The value of a parsed dimension; every intermediate value is bounded."""
    if node.op == "int":
        return node.value
    if node.op == "sym":
        return _bounded(bindings[node.value])
    if node.op == "neg":
        return -evaluate(node.args[0], bindings)
    if node.op in _CALLS:
        return _CALLS[node.op](evaluate(x, bindings) for x in node.args)
    a, b = (evaluate(x, bindings) for x in node.args)
    if node.op == "+":
        return _bounded(a + b)
    if node.op == "-":
        return _bounded(a - b)
    if node.op == "*":
        return _bounded(a * b)
    if b == 0:
        raise ValueError("a dimension divides by zero")
    return a // b


def _bounded(value: int) -> int:
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"a dimension's arithmetic exceeds 2**62 ({value})")
    return value
