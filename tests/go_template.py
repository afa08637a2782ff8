"""A small renderer for the part of Go's text/template that our Ollama TEMPLATE uses, with Go's semantics.

Implemented: text; ``{{ pipeline }}`` printing a string (or bool/int); ``{{-`` / ``-}}`` trim markers (all adjacent
space, tab, CR and newline, as Go's lexer trims them); ``.`` / ``.Field.Field`` / ``$`` / ``$.Field``; string
literals; ``eq a b ...``; ``if`` / ``else`` / ``end``; ``range`` / ``else`` / ``end`` over a list. Truth follows Go:
empty strings and lists, ``false``, ``0`` and nil are false.

Everything else (``with``, ``else if``, pipes, variables other than ``$``, ``len``, ``slice``, comments, numbers,
``template``/``define``, missing fields, ...) raises :class:`GoTemplateError` rather than being guessed at, so a
test cannot pass on something this renderer misreads.
"""

from __future__ import annotations

import re

_SPACE = " \t\r\n"  # Go's lexer: isSpace
_FIELD = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_KEYWORDS = {"if", "range", "else", "end"}
_FUNCTIONS = {"eq"}


class GoTemplateError(ValueError):
    """A construct this renderer does not implement, or an error Go's text/template would raise too."""


def render(template: str, data: object) -> str:
    """Render ``template`` with ``data`` as the root (``.`` and ``$``); dicts stand for Go maps and structs."""
    nodes, _ = _parse(_lex(template), 0, top=True)
    out: list[str] = []
    _execute(nodes, data, data, out)
    return "".join(out)


# -- lexing: text and actions, with trim markers applied as Go's lexer applies them -------------------------------
def _lex(template: str) -> list[tuple[str, object]]:
    """``("text", str)`` and ``("action", [tokens])`` items."""
    items: list[tuple[str, object]] = []
    pos, trim_next = 0, False
    while True:
        start = template.find("{{", pos)
        text = template[pos:] if start < 0 else template[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            if text:
                items.append(("text", text))
            return items
        inner = start + 2
        if template[inner:inner + 1] == "-" and template[inner + 1:inner + 2] in list(_SPACE):  # "{{- ", not "{{-3"
            text = text.rstrip(_SPACE)
            inner += 2
        if text:
            items.append(("text", text))
        tokens, end, right_trim = _lex_action(template, inner)
        items.append(("action", tokens))
        pos, trim_next = end, right_trim


def _lex_action(template: str, pos: int) -> tuple[list[tuple[str, str]], int, bool]:
    """Tokens of one action from ``pos`` to its ``}}``: (kind, text) with kinds field, root, dot, string, word."""
    tokens: list[tuple[str, str]] = []
    while True:
        if pos >= len(template):
            raise GoTemplateError("unclosed action: no }}")
        c = template[pos]
        if c in _SPACE:
            if template.startswith("-}}", pos + 1):  # " -}}": right trim marker
                return tokens, pos + 4, True
            pos += 1
        elif template.startswith("}}", pos):
            return tokens, pos + 2, False
        elif c == '"':
            value, pos = _lex_string(template, pos + 1)
            tokens.append(("string", value))
        elif c == ".":
            m = _FIELD.match(template, pos)
            if m:
                tokens.append(("field", m.group()))
                pos = m.end()
            else:
                tokens.append(("dot", "."))
                pos += 1
        elif c == "$":
            if _WORD.match(template, pos + 1) or template[pos + 1:pos + 2].isdigit():
                raise GoTemplateError(f"variables other than $ are not implemented: {template[pos:pos + 12]!r}")
            m = _FIELD.match(template, pos + 1)
            tokens.append(("root", m.group() if m else ""))
            pos = m.end() if m else pos + 1
        elif c.isalpha() or c == "_":
            m = _WORD.match(template, pos)
            word = m.group()
            if word not in _KEYWORDS | _FUNCTIONS:
                raise GoTemplateError(f"{word!r} is not implemented (only {sorted(_KEYWORDS | _FUNCTIONS)})")
            tokens.append(("word", word))
            pos = m.end()
        else:  # numbers, '-', '|', '(', ':=', ',', raw strings, comments, ...
            raise GoTemplateError(f"not implemented in an action: {template[pos:pos + 12]!r}")


def _lex_string(template: str, pos: int) -> tuple[str, int]:
    chars = []
    while pos < len(template):
        c = template[pos]
        if c == '"':
            return "".join(chars), pos + 1
        if c == "\n":
            break
        if c == "\\":
            escaped = template[pos + 1:pos + 2]
            if escaped not in _STRING_ESCAPES:
                raise GoTemplateError(f"string escape \\{escaped} is not implemented")
            chars.append(_STRING_ESCAPES[escaped])
            pos += 2
        else:
            chars.append(c)
            pos += 1
    raise GoTemplateError("unterminated string literal")


# -- parsing: a list of nodes; if/range carry (pipeline, body, else body) ------------------------------------------
def _parse(items: list, i: int, top: bool = False) -> tuple[list, int]:
    """Nodes from ``items[i]`` up to the ``else``/``end`` that closes them (returned as the stop index)."""
    nodes: list = []
    while i < len(items):
        kind, value = items[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        tokens = value
        if not tokens:
            raise GoTemplateError("empty action {{ }}: missing value for command")
        head = tokens[0]
        if head == ("word", "end") or head == ("word", "else"):
            if top:
                raise GoTemplateError(f"unexpected {{{{ {head[1]} }}}}")
            if len(tokens) > 1:
                raise GoTemplateError(f"{{{{ {head[1]} }}}} takes nothing after it here ('else if' is not implemented)")
            return nodes, i
        if head in (("word", "if"), ("word", "range")):
            pipeline = _pipeline(tokens[1:])
            body, i = _parse(items, i + 1)
            other: list = []
            if i < len(items) and items[i][1][0] == ("word", "else"):
                other, i = _parse(items, i + 1)
                if items[i][1][0] == ("word", "else"):
                    raise GoTemplateError(f"a second {{{{ else }}}} in one {head[1]}")
            nodes.append((head[1], pipeline, body, other))
            i += 1
            continue
        nodes.append(("print", _pipeline(tokens)))
        i += 1
    if not top:
        raise GoTemplateError("unexpected EOF: missing {{ end }}")
    return nodes, i


def _pipeline(tokens: list) -> tuple:
    """One command: an operand, or ``eq`` applied to operands."""
    if not tokens:
        raise GoTemplateError("missing value for command")
    if tokens[0] == ("word", "eq"):
        args = tokens[1:]
        if len(args) < 2:
            raise GoTemplateError("eq needs at least two arguments")
        for arg in args:
            _operand(arg)
        return ("eq", args)
    if len(tokens) != 1:
        raise GoTemplateError(f"{tokens[0]} is not a function: only eq takes arguments here")
    return ("value", _operand(tokens[0]))


def _operand(token: tuple) -> tuple:
    if token[0] == "word":
        raise GoTemplateError(f"{token[1]!r} cannot be used as a value")
    return token


# -- execution ------------------------------------------------------------------------------------------------------
def _execute(nodes: list, dot: object, root: object, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            out.append(_to_text(_evaluate(node[1], dot, root)))
        elif kind == "if":
            _execute(node[2] if _is_true(_evaluate(node[1], dot, root)) else node[3], dot, root, out)
        elif kind == "range":
            items = _evaluate(node[1], dot, root)
            if not isinstance(items, list):
                raise GoTemplateError(f"range over {type(items).__name__} is not implemented (lists only)")
            for item in items:
                _execute(node[2], item, root, out)
            if not items:
                _execute(node[3], dot, root, out)


def _evaluate(pipeline: tuple, dot: object, root: object) -> object:
    if pipeline[0] == "eq":
        first, *others = (_value(arg, dot, root) for arg in pipeline[1])
        for other in others:
            if type(other) is not type(first) or not isinstance(first, (str, bool, int)):
                raise GoTemplateError(f"incompatible types for comparison: {first!r}, {other!r}")
        return any(first == other for other in others)
    return _value(pipeline[1], dot, root)


def _value(token: tuple, dot: object, root: object) -> object:
    kind, text = token
    if kind == "string":
        return text
    if kind == "dot":
        return dot
    value = root if kind == "root" else dot
    for name in text.split(".")[1:]:
        if not isinstance(value, dict):
            raise GoTemplateError(f"can't evaluate field {name} in type {type(value).__name__}")
        if name not in value:
            raise GoTemplateError(f"no field {name!r} (missing fields are not implemented)")
        value = value[name]
    return value


def _is_true(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, str, list)):
        return bool(value)  # Go: false, 0, "", an empty slice and nil are false
    # a dict stands for a Go map (true when not empty) or a struct (always true): ambiguous, so refused
    raise GoTemplateError(f"truth of {type(value).__name__} is not implemented")


def _to_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise GoTemplateError(f"printing {type(value).__name__} is not implemented")
