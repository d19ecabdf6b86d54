"""Pipeline text: ``discover,prune{ratio=0.3,kinds=attn,mlp},compress``.

A real lexer (quoted strings allowed: ``recover{data="my data.yaml"}``) and a parser that
turns option text into typed field values, with one clear error for an unknown pass, an
unknown option (with the closest name) or an ill-typed value. :func:`format_pipeline` prints
a pipeline back in canonical form, and parsing that form gives the same passes, so a run can
be reproduced from its own log.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from typing import Any

from lorashear.errors import PassError
from lorashear.passes.base import ModulePass, field_name, option_name
from lorashear.passes.registry import get_pass

_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<punct>[{},=])|(?P<word>[^\s{},="]+))')


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise PassError(f"pipeline {text!r}: unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "string":
            value = json.loads(value)
        out.append((kind, value, m.start(kind)))
        pos = m.end()
    return out


def parse_pipeline(text: str) -> list[ModulePass]:
    """Parse pipeline text into configured pass instances."""
    tokens = _tokens(text)
    passes: list[ModulePass] = []
    i = 0

    def fail(message: str) -> None:
        col = tokens[i][2] + 1 if i < len(tokens) else len(text) + 1
        raise PassError(f"pipeline {text!r}, column {col}: {message}")

    if not tokens:
        raise PassError("the pipeline is empty", hint="e.g. --passes=discover,prune{ratio=0.2},compress")
    while True:
        if i >= len(tokens) or tokens[i][0] != "word":
            fail("expected a pass name")
        name = tokens[i][1]
        cls = get_pass(name)
        i += 1
        raw: dict[str, list[str]] = {}
        if i < len(tokens) and tokens[i][1] == "{" and tokens[i][0] == "punct":
            i += 1
            current: str | None = None
            while True:
                if i >= len(tokens):
                    fail(f"unclosed '{{' in the options of {name}")
                kind, value, _ = tokens[i]
                if kind == "punct" and value == "}":
                    i += 1
                    break
                if kind == "punct":
                    fail(f"expected an option of {name}, found {value!r}")
                if i + 1 < len(tokens) and tokens[i + 1][:2] == ("punct", "="):
                    if kind != "word":
                        fail("an option name cannot be a quoted string")
                    current = value
                    if current in raw:
                        fail(f"option {current!r} of {name} is given twice")
                    i += 2
                    if i >= len(tokens) or tokens[i][0] == "punct":
                        fail(f"option {current!r} of {name} needs a value")
                    raw[current] = [tokens[i][1]]
                elif current is None:
                    fail(f"expected option=value in the options of {name}, found {value!r}")
                else:
                    raw[current].append(value)  # `kinds=attn,mlp`: a list continues
                i += 1
                if i < len(tokens) and tokens[i][:2] == ("punct", ","):
                    i += 1
        passes.append(build_pass(cls, raw))
        if i >= len(tokens):
            return passes
        if tokens[i][:2] != ("punct", ","):
            fail(f"expected ',' between passes, found {tokens[i][1]!r}")
        i += 1


def build_pass(cls: type[ModulePass], raw: dict[str, list[str]]) -> ModulePass:
    """Instantiate ``cls`` from option texts, converting each to its field's type."""
    types_by_field = cls.option_types()
    values: dict[str, Any] = {}
    for opt, texts in raw.items():
        fname = field_name(opt)
        if fname not in types_by_field:
            known = [option_name(f) for f in types_by_field]
            close = difflib.get_close_matches(opt, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"its options are {', '.join(known)}" if known else "it takes no options")
            raise PassError(f"pass {cls.name!r} has no option {opt!r}", hint=hint)
        try:
            values[fname] = convert_option(types_by_field[fname], texts)
        except ValueError as exc:
            raise PassError(f"option {opt!r} of pass {cls.name!r}: {exc}") from None
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise PassError(f"pass {cls.name!r}: {exc}") from None


def _scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if tp is str:
        return text
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
        return text
    raise ValueError(f"unsupported option type {tp}")


def convert_option(tp: Any, texts: list[str]) -> Any:
    """Convert the text values of one option to ``tp`` (scalars, Optional, tuples, Literal)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(texts) == 1 and texts[0].lower() == "none" and len(args) < len(typing.get_args(tp)):
            return None
        wanted = []
        for arg in args:  # the first member type that takes the text (float | Literal["auto"])
            try:
                return convert_option(arg, texts)
            except ValueError as exc:  # "expected a number, got 'x'": keep what each expected
                wanted.append(str(exc).removeprefix("expected ").rsplit(", got ", 1)[0])
        raise ValueError(f"expected {' or '.join(wanted)}, got {','.join(texts)!r}")
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_scalar(item, t) for t in texts)
    if len(texts) != 1:
        raise ValueError(f"expected one value, got {len(texts)}: {','.join(texts)}")
    return _scalar(tp, texts[0])


def format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    text = str(value)
    if text == "" or re.search(r'[\s{},="]', text):
        return json.dumps(text)
    return text


def format_pass(p: ModulePass) -> str:
    """Canonical text of one pass: options that differ from their defaults, in field order."""
    parts = []
    for f in p.option_fields():
        value = getattr(p, f.name)
        if value != f.default:
            parts.append(f"{option_name(f.name)}={format_value(value)}")
    return f"{p.name}{{{','.join(parts)}}}" if parts else p.name


def format_pipeline(passes: list[ModulePass]) -> str:
    return ",".join(format_pass(p) for p in passes)
