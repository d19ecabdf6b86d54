"""Turn reStructuredText sources (Sphinx ``_sources/*.rst.txt``) into plain text.

Documentation is good technical prose, but its markup (roles, directives, section
underlines, link targets) would teach a language model rst rather than English. This is a
deliberately small converter, not a docutils replacement: it keeps prose paragraphs (joined
to one line each), list items, table cells and code blocks (verbatim), and drops everything
that is only there for Sphinx (toctrees, index entries, kernel-doc includes, options).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorashear.data._text import clean_document, collapse_spaces

#: Directives whose argument and body are not prose (navigation, includes, raw output, math).
DROPPED_DIRECTIVES = frozenset({
    "toctree", "index", "image", "raw", "include", "literalinclude", "highlight", "module",
    "currentmodule", "moduleauthor", "sectionauthor", "codeauthor", "contents", "sectnum",
    "tabularcolumns", "cssclass", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "kernel-doc", "kernel-include", "kernel-feat", "kernel-abi", "kernel-render",
    "maintainers-include", "math", "testsetup", "testcleanup", "productionlist", "title",
    "meta", "autosummary", "audit-event", "audit-event-table", "limited-api-list",
    "miscnews", "changelog", "default-role", "role", "graphviz", "digraph", "kernel-figure",
    "figure", "only", "ifconfig", "rst-class", "container", "line-block", "opcode",
})

#: Directives whose body is code: kept line by line, no inline-markup processing.
LITERAL_DIRECTIVES = frozenset({
    "code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal",
    "prompt",
})

#: Directives whose argument is not worth keeping but whose body is prose.
ARGUMENT_FREE_DIRECTIVES = frozenset({
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error",
    "seealso", "impl-detail", "admonition", "glossary", "topic", "sidebar", "rubric",
    "epigraph", "highlights", "pull-quote", "compound", "list-table", "flat-table", "table",
    "csv-table", "centered", "hlist",
} | LITERAL_DIRECTIVES)

#: Directives whose argument is a title worth keeping as its own line.
TITLED_DIRECTIVES = frozenset({"list-table", "flat-table", "table", "csv-table", "topic",
                               "sidebar", "rubric", "admonition"})

#: Directives rendered as a short sentence (Sphinx prints these words too).
PHRASED_DIRECTIVES = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
    "availability": "Availability: {}.",
}

_EXPLICIT_MARKUP = re.compile(r"^\.\.(?:\s+|$)(.*)$")
_DIRECTIVE = re.compile(r"^([\w:.+-]+)\s*::+\s*(.*)$")
_SECTION_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+.:_<>])\1{2,}\s*$")
_TABLE_BORDER = re.compile(r"^(?:[+|][-=+:| ]*[+|]|=+(?: +=+)+|-+(?: +-+)+)\s*$")
_OPTION_LINE = re.compile(r"^:[\w-]+:(?:\s.*)?$")
_LIST_ITEM = re.compile(r"^(?:[-*+\u2022]|\d+[.)]|[#a-zA-Z][.)]|\(\d+\))\s+")
_FIELD = re.compile(r"^:([^:`\s][^:`]*):(?:\s+|$)")

_INLINE = re.compile(
    r"(?P<role>(?::[\w.+-]+)+:`(?P<role_text>[^`]*)`)"
    r"|``(?P<literal>.+?)``"
    r"|`(?P<ref_text>[^`]+)`_{0,2}"
)
_TITLE_AND_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])")
_FOOTNOTE_REFERENCE = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*)\]_")
_SUBSTITUTION = re.compile(r"\|(\w[\w .-]*\w|\w)\|_{0,2}")
_NAMED_REFERENCE = re.compile(r"(?<=[A-Za-z0-9])_(?=[\s.,;:)!?]|$)")
_ESCAPE = re.compile(r"\\([\\`*_|:<>\[\]\-])")
_SPAN_ROLE = re.compile(r":[rc]span:`\d+`")
#: Explicit markup left inside table cells and list items (``* .. _label:``).
_EMBEDDED_MARKUP = re.compile(r"(?:^|(?<=\s))\.\. (?:_[^:`]+:|[\w:.-]+::)(?=\s|$)")


@dataclass
class _Output:
    """Lines produced so far, and the prose paragraph being joined."""

    lines: list[str] = field(default_factory=list)
    paragraph: list[str] = field(default_factory=list)
    paragraph_column: int = 0

    def flush(self) -> None:
        # Inline markup may span line breaks, so it is stripped from the joined paragraph.
        if self.paragraph:
            self.lines.append(collapse_spaces(inline_to_text(" ".join(self.paragraph))))
            self.paragraph = []

    def prose(self, text: str, indent: int, content_column: int, starts_item: bool) -> None:
        """Add one prose line, joining it to the paragraph when it continues it."""
        if not text:
            return
        if starts_item or not self.paragraph or indent != self.paragraph_column:
            self.flush()
            self.paragraph_column = content_column
        self.paragraph.append(text)

    def verbatim(self, text: str) -> None:
        self.flush()
        if text.strip():
            self.lines.append(text.rstrip())


def rst_to_text(source: str) -> str:
    """Convert one reStructuredText document to plain text in the cache layout."""
    lines = source.expandtabs(8).splitlines()
    out = _Output()
    _convert_block(lines, 0, len(lines), out)
    out.flush()
    return clean_document("\n".join(out.lines), keep_spacing=True)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, stop: int, parent_indent: int) -> int:
    """Index after the indented block starting at ``start`` (lines deeper than the parent)."""
    end = start
    while end < stop and (not lines[end].strip() or _indent(lines[end]) > parent_indent):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _convert_block(lines: list[str], start: int, stop: int, out: _Output) -> None:
    """Convert ``lines[start:stop]``: explicit markup, literal blocks, tables and prose."""
    index = start
    literal_follows = False
    literal_parent_indent = 0
    in_simple_table = False
    while index < stop:
        line = lines[index]
        stripped = line.strip()
        indent = _indent(line)
        if not stripped:
            out.flush()
            in_simple_table = False
            index += 1
            continue
        if literal_follows:
            literal_follows = False
            if indent > literal_parent_indent:  # else malformed rst: no literal block after all
                end = _block_end(lines, index, stop, literal_parent_indent)
                _emit_verbatim(lines[index:end], out)
                index = end
                continue
        markup = _EXPLICIT_MARKUP.match(stripped)
        if markup:
            end = _block_end(lines, index + 1, stop, indent)
            _convert_explicit_markup(markup.group(1), lines, index, end, indent, out)
            index = end
            continue
        if _SECTION_ADORNMENT.match(stripped) or _TABLE_BORDER.match(stripped):
            out.flush()
            in_simple_table = bool(_TABLE_BORDER.match(stripped)) and "=" in stripped
            index += 1
            continue
        if stripped.startswith(">>>"):
            end = index
            while end < stop and lines[end].strip():
                end += 1
            _emit_verbatim(lines[index:end], out)
            index = end
            continue
        if stripped == "::":
            out.flush()
            literal_follows, literal_parent_indent = True, indent
            index += 1
            continue
        if stripped.endswith("::"):
            literal_follows, literal_parent_indent = True, indent
            stripped = stripped[:-2].rstrip() + (":" if not stripped[:-2].endswith(" ") else "")
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            cells = [cell.strip() for cell in stripped.strip("|").split("|")]
            out.verbatim(collapse_spaces(inline_to_text(" | ".join(c for c in cells if c))))
        elif in_simple_table:
            out.verbatim(collapse_spaces(inline_to_text(stripped)))
        else:
            item = _LIST_ITEM.match(stripped)
            field_match = _FIELD.match(stripped) if not item else None
            if field_match:
                stripped = f"{field_match.group(1)}: {stripped[field_match.end():]}".rstrip()
            content_column = indent + (item.end() if item else 0)
            out.prose(stripped, indent, content_column, starts_item=bool(item or field_match))
            if literal_follows:
                # A literal block belongs to the paragraph (a list item's text, not its bullet).
                literal_parent_indent = out.paragraph_column
        index += 1


def _emit_verbatim(block: list[str], out: _Output) -> None:
    """Emit a code block dedented, one line each (blank lines dropped by the layout)."""
    body = [line for line in block if line.strip()]
    if not body:
        return
    margin = min(_indent(line) for line in body)
    for line in body:
        out.verbatim(line[margin:])


def _convert_explicit_markup(text: str, lines: list[str], index: int, end: int, indent: int,
                             out: _Output) -> None:
    """Handle a ``..`` construct: directive, footnote, target, substitution or comment."""
    out.flush()
    directive = _DIRECTIVE.match(text)
    if text.startswith("["):  # footnote or citation: keep its text
        label_end = text.find("]")
        out.prose(text[label_end + 1:].strip(), indent, indent, True)
        _convert_block(lines, index + 1, end, out)
        return
    if not directive:
        return  # a comment, a target (.. _name:), a substitution (.. |x| ...) or "..": no text
    name, argument = directive.group(1).lower(), directive.group(2).strip()
    if name in DROPPED_DIRECTIVES:
        return
    body_start = index + 1
    argument_lines = [argument] if argument else []
    options_seen = False
    while body_start < end and lines[body_start].strip():
        following = lines[body_start].strip()
        if _OPTION_LINE.match(following):
            options_seen = True
        elif options_seen or name in ARGUMENT_FREE_DIRECTIVES:
            break  # the body starts without a blank line
        else:
            argument_lines.append(following)  # a continued argument, or one more signature
        body_start += 1
    argument = " ".join(argument_lines) if name in PHRASED_DIRECTIVES else argument
    if name in PHRASED_DIRECTIVES:
        version = argument.split()[0] if argument else ""
        rest = " ".join(argument.split()[1:])
        phrase = PHRASED_DIRECTIVES[name].format(version) + (f" {rest}" if rest else "")
        out.prose(phrase, indent, indent, True)
    elif name not in ARGUMENT_FREE_DIRECTIVES:
        for signature in _join_continued(argument_lines):
            out.verbatim(inline_to_text(signature))
    elif name in TITLED_DIRECTIVES and argument:
        out.verbatim(inline_to_text(argument))
    body = lines[body_start:end]
    if name in LITERAL_DIRECTIVES:
        _emit_verbatim(body, out)
    elif body:
        _convert_block(lines, body_start, end, out)
    out.flush()


def _join_continued(lines: list[str]) -> list[str]:
    """Join signature lines that end in a backslash with the line after them."""
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + line
        else:
            joined.append(line)
    return joined


def inline_to_text(text: str) -> str:
    """Strip inline markup from one line of prose: roles, literals, links, emphasis, escapes."""
    text = _SPAN_ROLE.sub("", text)
    pieces = []
    position = 0
    for match in _INLINE.finditer(text):
        pieces.append(_plain_inline(text[position:match.start()]))
        if match.group("role") is not None:
            role = match.group("role").split("`", 1)[0].strip(":").rsplit(":", 1)[-1]
            visible = _role_text(match.group("role_text"))
            pieces.append(f"{role.upper()} {visible}" if role in ("rfc", "pep") else visible)
        elif match.group("literal") is not None:
            pieces.append(match.group("literal"))
        else:
            pieces.append(_role_text(match.group("ref_text")))
        position = match.end()
    pieces.append(_plain_inline(text[position:]))
    return "".join(pieces).strip()


def _role_text(content: str) -> str:
    """The visible text of interpreted text: ``title <target>`` shows the title, ``~a.b`` b."""
    titled = _TITLE_AND_TARGET.match(content)
    if titled and titled.group(1):
        return titled.group(1)
    if titled:
        content = content.strip("<>")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    return content.lstrip("!")


def _plain_inline(text: str) -> str:
    """Remove markup from text outside backticks (emphasis, footnote refs, substitutions)."""
    text = _FOOTNOTE_REFERENCE.sub("", text)
    text = _EMBEDDED_MARKUP.sub("", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    text = _NAMED_REFERENCE.sub("", text)
    return _ESCAPE.sub(r"\1", text)
