"""The client `where` clause of a shape request: a small SQL subset, parsed and re-rendered.

Electric accepts a restricted SQL expression (no subqueries, no arbitrary functions). We
parse it into a tree and render SQL from the tree ourselves, with every literal and `$n`
parameter re-quoted, so a client can never inject SQL. Columns are limited to the shape's
pinned columns: a filter on a hidden column (e.g. `write_token LIKE 'a%'`) would leak it
one bit at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from electric_agents.errors import ApiError

# Rendering a column needs to know which row image it reads (the snapshot's table row, or
# a change log row's new or old image), so the tree is rendered with a qualifier function.
Qualify = Callable[[str], str]

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<param>\$\d+)
    | (?P<quoted>"(?:[^"]|"")+")
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op><>|!=|<=|>=|->>|->|::|@>|<@|&&|[=<>(),\[\]-])
    )""",
    re.VERBOSE,
)
_KEYWORDS = frozenset(
    {"AND", "OR", "NOT", "IS", "NULL", "TRUE", "FALSE", "IN", "LIKE", "ILIKE", "ARRAY"}
)
_COMPARISONS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "@>", "<@", "&&"})
_CASTS = frozenset(
    {
        "text", "int", "int2", "int4", "int8", "integer", "bigint", "smallint", "boolean",
        "bool", "jsonb", "numeric", "float8", "timestamptz", "text[]", "int4[]", "int8[]",
    }
)  # fmt: skip
MAX_WHERE_LENGTH = 4096
MAX_DEPTH = 64


def _bad(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", f"Invalid where clause: {message}")


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise _bad("NUL character in a literal")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class _Token:
    kind: str  # string | number | param | ident | keyword | op | end
    text: str


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(source):
        if source[position:].strip() == "":
            break
        found = _TOKEN.match(source, position)
        if found is None or found.end() == position:
            raise _bad(f"unexpected input at character {position}")
        position = found.end()
        kind = found.lastgroup or ""
        text = found.group(kind)
        if kind == "string":
            tokens.append(_Token("string", text[1:-1].replace("''", "'")))
        elif kind == "quoted":
            tokens.append(_Token("ident", text[1:-1].replace('""', '"')))
        elif kind == "word":
            upper = text.upper()
            if upper in _KEYWORDS:
                tokens.append(_Token("keyword", upper))
            else:
                tokens.append(_Token("ident", text.lower()))
        else:
            tokens.append(_Token(kind, text))
    tokens.append(_Token("end", ""))
    return tokens


# The tree: each node renders itself given a column qualifier.
Node = Callable[[Qualify], str]


class _Parser:
    def __init__(
        self, tokens: list[_Token], columns: frozenset[str], params: Mapping[str, str]
    ) -> None:
        self.tokens = tokens
        self.index = 0
        self.columns = columns
        self.params = params
        self.depth = 0

    def peek(self, offset: int = 0) -> _Token:
        return self.tokens[min(self.index + offset, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.index += 1
        return token

    def accept(self, kind: str, text: str) -> bool:
        token = self.peek()
        if token.kind == kind and token.text == text:
            self.index += 1
            return True
        return False

    def expect(self, kind: str, text: str) -> None:
        if not self.accept(kind, text):
            raise _bad(f"expected {text!r}, found {self.peek().text or 'end of input'!r}")

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _bad("expression nested too deeply")

    def parse(self) -> Node:
        node = self.disjunction()
        if self.peek().kind != "end":
            raise _bad(f"unexpected {self.peek().text!r}")
        return node

    def disjunction(self) -> Node:
        parts = [self.conjunction()]
        while self.accept("keyword", "OR"):
            parts.append(self.conjunction())
        if len(parts) == 1:
            return parts[0]
        return lambda q: "(" + " OR ".join(part(q) for part in parts) + ")"

    def conjunction(self) -> Node:
        parts = [self.negation()]
        while self.accept("keyword", "AND"):
            parts.append(self.negation())
        if len(parts) == 1:
            return parts[0]
        return lambda q: "(" + " AND ".join(part(q) for part in parts) + ")"

    def negation(self) -> Node:
        if self.accept("keyword", "NOT"):
            self.nested()
            inner = self.negation()
            return lambda q: f"(NOT {inner(q)})"
        return self.predicate()

    def predicate(self) -> Node:
        left = self.operand()
        token = self.peek()
        if token.kind == "op" and token.text in _COMPARISONS:
            self.take()
            op = "<>" if token.text == "!=" else token.text
            right = self.operand()
            return lambda q: f"({left(q)} {op} {right(q)})"
        if self.accept("keyword", "IS"):
            negated = self.accept("keyword", "NOT")
            value = self.take()
            if value.kind != "keyword" or value.text not in ("NULL", "TRUE", "FALSE"):
                raise _bad("IS must be followed by [NOT] NULL, TRUE or FALSE")
            test = f"IS {'NOT ' if negated else ''}{value.text}"
            return lambda q: f"({left(q)} {test})"
        negated = False
        if token.kind == "keyword" and token.text == "NOT":
            self.take()
            negated = True
        if self.accept("keyword", "IN"):
            self.expect("op", "(")
            items = [self.operand()]
            while self.accept("op", ","):
                items.append(self.operand())
            self.expect("op", ")")
            keyword = "NOT IN" if negated else "IN"
            return lambda q: f"({left(q)} {keyword} (" + ", ".join(i(q) for i in items) + "))"
        for keyword in ("LIKE", "ILIKE"):
            if self.accept("keyword", keyword):
                right = self.operand()
                full = f"NOT {keyword}" if negated else keyword
                return lambda q: f"({left(q)} {full} {right(q)})"
        if negated:
            raise _bad("NOT must be followed by IN, LIKE or ILIKE here")
        return left

    def operand(self) -> Node:
        node = self.primary()
        while True:
            if self.accept("op", "::"):
                node = self.cast(node)
            elif self.peek().kind == "op" and self.peek().text in ("->", "->>"):
                op = self.take().text
                key = self.primary()
                node = _binary(node, op, key)
            else:
                return node

    def cast(self, node: Node) -> Node:
        name = self.take()
        if name.kind != "ident":
            raise _bad("expected a type name after ::")
        type_name = name.text
        if self.accept("op", "["):
            self.expect("op", "]")
            type_name += "[]"
        if type_name not in _CASTS:
            raise _bad(f"unsupported cast to {type_name}")
        return lambda q: f"({node(q)})::{type_name}"

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "op" and token.text == "(":
            self.nested()
            inner = self.disjunction()
            self.expect("op", ")")
            return lambda q: f"({inner(q)})"
        if token.kind == "op" and token.text == "-" and self.peek().kind == "number":
            number = self.take().text
            return lambda _q: f"(-{number})"
        if token.kind == "number":
            return lambda _q: token.text
        if token.kind == "string":
            literal = quote_literal(token.text)
            return lambda _q: literal
        if token.kind == "param":
            name = token.text[1:]
            if name not in self.params:
                raise _bad(f"parameter {token.text} has no value (params[{name}])")
            literal = quote_literal(self.params[name])
            return lambda _q: literal
        if token.kind == "keyword" and token.text in ("NULL", "TRUE", "FALSE"):
            return lambda _q: token.text
        if token.kind == "keyword" and token.text == "ARRAY":
            self.expect("op", "[")
            items = [self.operand()]
            while self.accept("op", ","):
                items.append(self.operand())
            self.expect("op", "]")
            return lambda q: "ARRAY[" + ", ".join(i(q) for i in items) + "]"
        if token.kind == "ident":
            if token.text not in self.columns:
                raise _bad(f"unknown column {token.text!r}")
            column = token.text
            return lambda q: q(column)
        raise _bad(f"unexpected {token.text or 'end of input'!r}")


def _binary(left: Node, op: str, right: Node) -> Node:
    return lambda q: f"({left(q)} {op} {right(q)})"


def parse_where(source: str, columns: frozenset[str], params: Mapping[str, str]) -> Node:
    """The client's where clause as a tree over `columns`; 400 INVALID_REQUEST if it is not
    in the supported subset."""
    if len(source) > MAX_WHERE_LENGTH:
        raise _bad("too long")
    return _Parser(_tokenize(source), columns, params).parse()
