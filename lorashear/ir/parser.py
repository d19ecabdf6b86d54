"""Parser of the IR text form written by :mod:`lorashear.ir.printer`.

A small hand-written lexer and recursive-descent parser: every error names the source, line
and column, and says what was expected. Malformed input of any kind raises
:class:`~lorashear.errors.IRParseError` (the fuzz tests hold it to that), a newer format
version :class:`~lorashear.errors.IRFormatVersionError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable

from lorashear.errors import IRFormatVersionError, IRParseError
from lorashear.ir.attributes import attribute_kind
from lorashear.ir.core import DTypeArg, Module, Op, Param, Value
from lorashear.ir.dims import MAX_MAGNITUDE, DimSyntaxError, parse_dim
from lorashear.ir.fingerprint import FINGERPRINT_PATTERN
from lorashear.ir.printer import FORMAT_VERSION, MAGIC
from lorashear.ir.storage import DataStorage, FileStorage, MetaStorage, Storage
from lorashear.ir.types import DTYPES, SYM, TensorType, ValueType, is_symbol_name

#: Integer literals of op arguments stay within 64 bits (what torch takes); more digits than
#: this are refused before ``int()`` is asked to convert them.
_MAX_INT = 1 << 64
_MAX_INT_DIGITS = len(str(_MAX_INT))
#: Op arguments are lists of lists at most (shapes, index lists); deeper is refused, not recursed.
_MAX_LIST_DEPTH = 16

_TOKEN = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<param>@[A-Za-z0-9_.\-/:]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)|-inf\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\],:=])
""", re.VERBOSE)


class _Line:
    """Tokens of one line with a cursor; errors point at the current token's column."""

    def __init__(self, text: str, lineno: int, source: str) -> None:
        self.text, self.lineno, self.source = text, lineno, source
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                self.fail(f"unexpected character {text[pos]!r}", pos)
            if m.lastgroup != "ws":
                self.tokens.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.i = 0

    def fail(self, message: str, column: int | None = None) -> None:
        if column is None:
            column = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        raise IRParseError(message, source=self.source, line=self.lineno, column=column + 1)

    def column(self) -> int:
        """The 0-based column of the token at the cursor (the line's end after the last)."""
        return self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i][:2] if self.i < len(self.tokens) else None

    def next(self, what: str) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            self.fail(f"expected {what}, found end of line")
        tok = self.tokens[self.i]
        self.i += 1
        return tok[0], tok[1]

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> str:
        what = what or (repr(text) if text else kind)
        if self.i >= len(self.tokens):
            self.fail(f"expected {what}, found end of line")
        k, t, _ = self.tokens[self.i]
        if k != kind or (text is not None and t != text):
            self.fail(f"expected {what}, found {t!r}")
        self.i += 1
        return t

    def accept(self, kind: str, text: str | None = None) -> bool:
        tok = self.peek()
        if tok and tok[0] == kind and (text is None or tok[1] == text):
            self.i += 1
            return True
        return False

    def end(self) -> None:
        if self.i < len(self.tokens):
            self.fail(f"unexpected {self.tokens[self.i][1]!r} at end of statement")


class IRParser:
    """Parses one module; ``resolve_path`` maps weight-file paths as written to real paths."""

    def __init__(self, text: str, *, source: str = "<string>",
                 resolve_path: Callable[[str], str] | None = None,
                 sidecar: Callable[[str], FileStorage] | None = None) -> None:
        self.text, self.source = text, source
        self.resolve_path = resolve_path or (lambda p: p)
        self.sidecar = sidecar
        self.module = Module()
        self.values: dict[str, Value] = {}
        #: the line of each parameter's declaration, for errors about its weights
        self.param_lines: dict[str, int] = {}
        #: resolved weights-file path -> (recorded fingerprint, line of its ``weights`` statement)
        self.weights_files: dict[str, tuple[str, int]] = {}

    def parse(self) -> Module:
        lines = self.text.split("\n")
        header_seen = False
        for lineno, raw in enumerate(lines, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if not header_seen:
                self._header(text, lineno)
                header_seen = True
                continue
            if text.split(None, 1)[0] == "attr":
                self._attribute(text, lineno)
                continue
            line = _Line(text, lineno, self.source)
            self._statement(line)
            line.end()
        if not header_seen:
            raise IRParseError(f"empty input: not a {MAGIC} file", source=self.source, line=1, column=1)
        if not self.module.graph.outputs:
            raise IRParseError("module has no output", source=self.source, line=len(lines), column=1)
        self._attach_fingerprints()
        return self.module

    def _attach_fingerprints(self) -> None:
        """Give every handle into a fingerprinted file its fingerprint; a ``weights``
        statement no parameter reads is an error (it would not print back)."""
        used: set[str] = set()
        for p in self.module.params.values():
            if isinstance(p.storage, FileStorage) and p.storage.path in self.weights_files:
                used.add(p.storage.path)
                p.storage = dataclasses.replace(p.storage, fingerprint=self.weights_files[p.storage.path][0])
        for path, (_, lineno) in self.weights_files.items():
            if path not in used:
                raise IRParseError(f"no parameter reads the weights file {path} declared here",
                                   source=self.source, line=lineno, column=1)

    # --- statements ---------------------------------------------------------------------------
    def _header(self, text: str, lineno: int) -> None:
        words = text.split()
        if not words or words[0] != MAGIC:
            raise IRParseError(f"not a {MAGIC} file (expected the header '{MAGIC} {FORMAT_VERSION}')",
                               source=self.source, line=lineno, column=1)
        # ASCII and short: int() refuses superscripts that isdigit() accepts, and 4,300+ digits
        if len(words) != 2 or not (words[1].isascii() and words[1].isdigit() and len(words[1]) <= 9):
            raise IRParseError(f"malformed header {text!r}; expected '{MAGIC} <integer version>'",
                               source=self.source, line=lineno, column=1)
        if int(words[1]) > FORMAT_VERSION:
            raise IRFormatVersionError(
                f"{self.source} uses IR format version {words[1]}, newer than this lorashear "
                f"reads (version {FORMAT_VERSION})", hint="upgrade lorashear")

    def _statement(self, line: _Line) -> None:
        kind, word = line.peek() or ("", "")
        if kind == "ident" and word in ("param", "buffer"):
            line.next(word)
            self._param(line, buffer=word == "buffer")
        elif kind == "ident" and word == "weights":
            line.next("weights")
            self._weights(line)
        elif kind == "ident" and word == "input":
            line.next("input")
            self._input(line)
        elif kind == "ident" and word == "output":
            line.next("output")
            self._output(line)
        elif kind == "value":
            self._op(line)
        else:
            line.fail("expected a statement (attr, weights, param, buffer, input, output or "
                      f"%value = op), found {word!r}")

    def _weights(self, line: _Line) -> None:
        """``weights "PATH" fingerprint "SCHEME:HEX"``: the fingerprint of a weights file."""
        path_column = line.column()
        path = self._string(line)
        line.expect("ident", "fingerprint", what="'fingerprint'")
        fingerprint_column = line.column()
        fingerprint = self._string(line)
        if FINGERPRINT_PATTERN.fullmatch(fingerprint) is None:
            line.fail(f"malformed fingerprint {fingerprint[:80]!r} (expected "
                      f"'{FINGERPRINT_PATTERN.pattern}')", fingerprint_column)
        resolved = self.resolve_path(path)
        if resolved in self.weights_files:
            line.fail(f"weights file {path!r} is declared twice", path_column)
        self.weights_files[resolved] = (fingerprint, line.lineno)

    _ATTR = re.compile(r"attr\s+([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*([A-Za-z_][A-Za-z0-9_.-]*)\s+(.*)$")

    def _attribute(self, text: str, lineno: int) -> None:
        """``attr NAME = KIND JSON``; the JSON payload is read by the kind's ``from_json``."""
        m = self._ATTR.match(text)
        if m is None:
            raise IRParseError("malformed attribute; expected 'attr NAME = KIND {json}'",
                               source=self.source, line=lineno, column=1)
        name, kind, payload = m.groups()
        if name in self.module.attributes:
            raise IRParseError(f"duplicate attribute {name!r}", source=self.source, line=lineno, column=1)
        cls = attribute_kind(kind)
        if cls is None:
            raise IRParseError(f"unknown attribute kind {kind!r}", source=self.source, line=lineno,
                               column=m.start(2) + 1)
        try:
            self.module.attributes[name] = cls.from_json(json.loads(payload))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise IRParseError(f"bad {kind} attribute payload: {str(exc)[:200]}", source=self.source,
                               line=lineno, column=m.start(3) + 1) from None

    def _param(self, line: _Line, *, buffer: bool) -> None:
        name = line.expect("param", what="@name")[1:]
        if name in self.module.params:
            line.fail(f"duplicate parameter @{name}")
        self.param_lines[name] = line.lineno
        line.expect("punct", ":")
        ty = self._type(line)
        if not isinstance(ty, TensorType) or not ty.is_static:
            line.fail(f"parameter @{name} needs a static tensor type")
        line.expect("punct", "=")
        storage = self._storage(line, name)
        self.module.add_param(Param(name, ty, storage, buffer=buffer))

    def _storage(self, line: _Line, name: str) -> Storage:
        word = line.expect("ident", what="storage (file(...), data or meta)")
        if word == "meta":
            return MetaStorage()
        if word == "data":
            if self.sidecar is None:
                return DataStorage(sidecar=FileStorage("<no sidecar>", name))
            return DataStorage(sidecar=self.sidecar(name))
        if word == "file":
            line.expect("punct", "(")
            path = self._string(line)
            line.expect("punct", ",")
            key = self._string(line)
            transposed = line.accept("punct", ",")
            if transposed:
                line.expect("ident", "transposed")
            line.expect("punct", ")")
            return FileStorage(self.resolve_path(path), key, transposed=transposed)
        line.fail(f"unknown storage {word!r}; expected file(...), data or meta")
        raise AssertionError

    def _string(self, line: _Line) -> str:
        token = line.expect("string")
        try:
            return json.loads(token)
        except ValueError:
            line.fail(f"malformed string {token}")
            raise AssertionError from None

    def _input(self, line: _Line) -> None:
        value = self._define(line)
        line.expect("punct", ":")
        value.type = self._type(line)
        self.module.graph.inputs.append(value)

    def _output(self, line: _Line) -> None:
        name = ""
        if line.peek() and line.peek()[0] == "ident":
            name = line.next("output name")[1]
            line.expect("punct", "=")
        self.module.graph.outputs.append(self._use(line))
        self.module.graph.output_names.append(name)
        names = self.module.graph.output_names
        if any(names) and not all(names):
            line.fail("either all outputs are named or none")

    def _op(self, line: _Line) -> None:
        results = [self._define(line, register=False)]
        while line.accept("punct", ","):
            results.append(self._define(line, register=False))
        line.expect("punct", "=")
        kind = line.expect("ident", what="op kind")
        line.expect("punct", "(")
        args: list = []
        kwargs: dict = {}
        if not line.accept("punct", ")"):
            while True:
                tok = line.peek()
                if tok and tok[0] == "ident" and line.i + 1 < len(line.tokens) \
                        and line.tokens[line.i + 1][1] == "=":
                    key = line.next("keyword")[1]
                    line.next("=")
                    if key in kwargs:
                        line.fail(f"duplicate keyword argument {key!r}")
                    kwargs[key] = self._arg(line)
                else:
                    if kwargs:
                        line.fail("positional argument after keyword argument")
                    args.append(self._arg(line))
                if line.accept("punct", ")"):
                    break
                line.expect("punct", ",", what="',' or ')'")
        line.expect("punct", ":")
        for r in results:  # defined only now, so an op cannot read its own result
            if r.name in self.values:
                line.fail(f"value %{r.name} is defined twice")
            self.values[r.name] = r
        for i, r in enumerate(results):
            if i:
                line.expect("punct", ",")
            r.type = self._type(line)
        loc = ""
        if line.accept("ident", "loc"):
            line.expect("punct", "(")
            loc = self._string(line)
            line.expect("punct", ")")
        self.module.graph.ops.append(Op(kind, args, kwargs, results, loc))

    # --- pieces -------------------------------------------------------------------------------
    def _define(self, line: _Line, *, register: bool = True) -> Value:
        name = line.expect("value", what="%value")[1:]
        if name in self.values:
            line.fail(f"value %{name} is defined twice")
        value = Value(name, SYM)
        if register:
            self.values[name] = value
        return value

    def _use(self, line: _Line) -> Value:
        token = line.expect("value", what="%value")
        value = self.values.get(token[1:])
        if value is None:
            line.fail(f"use of undefined value {token}")
        return value

    def _arg(self, line: _Line, depth: int = 0):
        tok = line.peek()
        if tok is None:
            line.fail("expected an argument, found end of line")
        kind, text = tok
        if kind == "value":
            return self._use(line)
        if kind == "param":
            line.next("param")
            param = self.module.params.get(text[1:])
            if param is None:
                line.i -= 1
                line.fail(f"use of undeclared parameter {text}")
            return param
        if kind == "string":
            return self._string(line)
        if kind == "number":
            if text == "-inf":
                line.next("number")
                return -math.inf
            if any(c in text for c in ".eE"):
                line.next("number")
                return float(text)
            return self._int(line, _MAX_INT, "an integer argument")
        if kind == "ident":
            line.next("identifier")
            constants = {"none": None, "true": True, "false": False, "inf": math.inf, "nan": math.nan}
            if text in constants:
                return constants[text]
            if text in DTYPES:
                return DTypeArg(text)
            line.i -= 1
            line.fail(f"unknown identifier {text!r} (expected none, true, false, inf, nan or an element type)")
        if kind == "punct" and text == "[":
            if depth >= _MAX_LIST_DEPTH:
                line.fail(f"lists nest deeper than {_MAX_LIST_DEPTH} levels")
            line.next("[")
            items: list = []
            if line.accept("punct", "]"):
                return items
            while True:
                items.append(self._arg(line, depth + 1))
                if line.accept("punct", "]"):
                    return items
                line.expect("punct", ",", what="',' or ']'")
        line.fail(f"expected an argument, found {text!r}")
        raise AssertionError

    def _type(self, line: _Line) -> ValueType:
        name = line.expect("ident", what="a type (f32[...], i64[...], sym)")
        if name == "sym":
            return SYM
        if name not in DTYPES:
            line.i -= 1
            line.fail(f"unknown element type {name!r}")
        line.expect("punct", "[")
        dims: list = []
        if not line.accept("punct", "]"):
            while True:
                tok = line.peek()
                if tok is None:
                    line.next("a dimension")
                kind, text = tok
                if kind == "number" and text.isdigit():
                    dims.append(self._int(line, MAX_MAGNITUDE, "a dimension"))
                elif kind in ("ident", "string"):
                    dims.append(self._symbolic_dim(line))
                else:
                    line.i -= 1
                    line.fail(f"expected a dimension, found {text!r}")
                if line.accept("punct", "]"):
                    break
                line.expect("punct", ",", what="',' or ']'")
        return TensorType(name, tuple(dims))

    def _int(self, line: _Line, bound: int, what: str) -> int:
        """The integer token at the cursor, refused (at its column) beyond ``bound``."""
        text = line.peek()[1]
        if len(text.lstrip("-")) > _MAX_INT_DIGITS or abs(int(text)) > bound:
            shown = text if len(text) <= 24 else text[:24] + "..."
            line.fail(f"{what} {shown} is out of range (at most {bound} in magnitude)")
        line.next("number")
        return int(text)

    def _symbolic_dim(self, line: _Line) -> str:
        """A size name (``S``) or a quoted size expression (``"S+1"``), checked against the
        grammar of :mod:`lorashear.ir.dims`."""
        column = line.column()
        kind, text = line.peek()
        if kind == "ident":
            if not is_symbol_name(text):
                line.fail(f"malformed size name {text!r}")
            line.next("a dimension")
            return text
        dim = self._string(line)
        try:
            parse_dim(dim)
        except DimSyntaxError as exc:
            line.fail(f"malformed dimension {dim[:80]!r}: {exc}", column + 1 + exc.offset)
        return dim


def parse_module(text: str, *, source: str = "<string>", resolve_path=None, sidecar=None) -> Module:
    """Parse IR text into a :class:`Module` (no verification; see :func:`verify`)."""
    return IRParser(text, source=source, resolve_path=resolve_path, sidecar=sidecar).parse()
