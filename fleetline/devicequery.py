"""The device query language: which devices a query, a job or a message route is about.

A query is a condition over each device's id, tags, twin and status::

    tags.site = 'A' AND reported.fw.version < '1.2' AND NOT status = 'offline'
    id IN ('pump-1', 'pump-2') OR (desired.mode != 'eco' AND reported.temp >= 30.5)

- Properties: ``id`` (alias ``deviceId``), ``status`` (``'online'`` or ``'offline'``),
  ``parent`` (the gateway a device is behind; ``= null``: none), ``gateway`` (``true``
  for a gateway),
  ``tags.<name>`` (the rest of the path is one tag name, which may hold dots),
  ``desired.<a.b.c>`` and ``reported.<a.b.c>`` (members of the twin's documents). A path
  segment that is not ``[A-Za-z0-9_:-]+`` is written in double quotes: ``reported."a b"``.
- Values: ``'text'`` (a quote inside doubled: ``'it''s'``), numbers, ``true``, ``false``,
  ``null``; or another JSON property, as in ``reported.fw != desired.fw``.
- Operators: ``=``, ``!=`` (or ``<>``), ``<``, ``<=``, ``>``, ``>=``, ``[NOT] IN (v, ...)``,
  ``AND``, ``OR``, ``NOT`` and parentheses; keywords in any case. ``AND`` binds tighter
  than ``OR``.

Semantics, for a JSON property (tags, desired, reported):

- ``=``/``!=`` compare JSON values: ``1 = 1.0``, ``'1' != 1``.
- ``<``/``>`` and friends compare numbers with numbers and text with text (by code
  point); a property of another type does not match.
- ``= null`` matches a missing property, ``!= null`` a present one.
- Any other comparison with a missing property is false, so ``NOT tags.site = 'A'``
  matches devices without a ``site`` tag while ``tags.site != 'A'`` does not.
  ``x NOT IN (...)`` is ``NOT (x IN (...))``: it matches them too.

The query compiles to a parameterised SQL condition over :data:`DEVICE_FROM`: values,
paths and names travel as parameters, never as SQL text. Errors are
:class:`QueryError` with the offset of the offending token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

MAX_QUERY_LENGTH = 4096
MAX_NESTING = 32
MAX_CONDITIONS = 100
MAX_IN_VALUES = 1000
MAX_PATH_SEGMENTS = 8
MAX_EXPONENT = 300

DEVICE_FROM = (
    "devices d"
    " LEFT JOIN device_activity a ON a.device_id = d.id"
    " LEFT JOIN twin_desired td ON td.device_id = d.id AND td.module_id = ''"
    " LEFT JOIN twin_reported tr ON tr.device_id = d.id AND tr.module_id = ''"
)

# The JSON document each root names (a device without a twin row has none: every
# comparison on it is with a missing property).
_DOCUMENTS = {"tags": "d.tags", "desired": "td.desired", "reported": "tr.reported"}
_SCALARS = {
    "id": "id",
    "deviceid": "id",
    "status": "status",
    "parent": "parent",
    "gateway": "gateway",
}
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
_COMPARISONS = {"=", "!=", "<>", "<", "<=", ">", ">="}
_STATUSES = {"online": True, "offline": False}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<number>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z0-9_:-]+|"(?:[^"]|"")+"))*)
    """,
    re.VERBOSE,
)
_SEGMENT = re.compile(r'[A-Za-z0-9_:-]+|"(?:[^"]|"")+"')


class QueryError(ValueError):
    """A query that cannot be compiled: ``message`` and the 0-based ``position`` of the
    offending text."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class Compiled:
    text: str
    where: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # string, number, op, punct, path, keyword, end
    text: str
    position: int

    def describe(self) -> str:
        return "the end of the query" if self.kind == "end" else repr(self.text)


# Characters PostgreSQL's text and jsonb cannot hold (NUL), or that are no character
# at all (halves of a UTF-16 surrogate pair).
_UNUSABLE = re.compile("[\x00\ud800-\udfff]")


def _tokens(text: str) -> list[_Token]:
    unusable = _UNUSABLE.search(text)
    if unusable is not None:
        raise QueryError(
            f"character U+{ord(unusable.group()):04X} is not allowed in a query",
            unusable.start(),
        )
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position] == "'":
                raise QueryError("unterminated 'string'", position)
            raise QueryError(f"unexpected character {text[position]!r}", position)
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "path" and "." not in value and value.lower() in _KEYWORDS:
            kind, value = "keyword", value.lower()
        if kind != "space":
            tokens.append(_Token(kind, value, position))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


@dataclass(slots=True)
class _Value:
    kind: str  # text, number, bool, null
    python: Any
    position: int


@dataclass(slots=True)
class _Compiler:
    tokens: list[_Token]
    first_param: int
    params: list[Any] = field(default_factory=list)
    index: int = 0
    depth: int = 0
    conditions: int = 0

    # -- tokens --
    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def accept(self, kind: str, text: str | None = None) -> _Token | None:
        token = self.peek()
        if token.kind == kind and (text is None or token.text == text):
            return self.take()
        return None

    def expect(self, kind: str, text: str, what: str) -> _Token:
        token = self.accept(kind, text)
        if token is None:
            found = self.peek()
            raise QueryError(f"expected {what}, found {found.describe()}", found.position)
        return token

    def param(self, value: Any, cast: str) -> str:
        self.params.append(value)
        return f"${self.first_param + len(self.params) - 1}::{cast}"

    # -- grammar --
    def query(self) -> str:
        if self.peek().kind == "end":
            return "true"
        sql = self.disjunction()
        token = self.peek()
        if token.kind != "end":
            raise QueryError(
                f"expected AND, OR or the end, found {token.describe()}", token.position
            )
        return sql

    def nested(self, position: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise QueryError(f"nested more than {MAX_NESTING} levels deep", position)

    def disjunction(self) -> str:
        parts = [self.conjunction()]
        while self.accept("keyword", "or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def conjunction(self) -> str:
        parts = [self.negation()]
        while self.accept("keyword", "and"):
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def negation(self) -> str:
        token = self.accept("keyword", "not")
        if token is not None:
            self.nested(token.position)
            inner = self.negation()
            self.depth -= 1
            return f"(NOT {inner})"
        return self.primary()

    def primary(self) -> str:
        token = self.accept("punct", "(")
        if token is not None:
            self.nested(token.position)
            inner = self.disjunction()
            self.expect("punct", ")", "')'")
            self.depth -= 1
            return inner
        return self.comparison()

    def comparison(self) -> str:
        token = self.take()
        if token.kind != "path":
            raise QueryError(
                "expected a property (id, status, parent, gateway, tags.…, desired.…, "
                "reported.…), "
                f"found {token.describe()}",
                token.position,
            )
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise QueryError(f"more than {MAX_CONDITIONS} comparisons", token.position)
        subject = _SCALARS.get(token.text.lower()) or self.document(token)
        operator = self.peek()
        if self.accept("keyword", "not"):
            self.expect("keyword", "in", "IN after NOT")
            return f"(NOT {self.membership(subject)})"
        if self.accept("keyword", "in"):
            return self.membership(subject)
        if operator.kind != "op":
            raise QueryError(
                f"expected an operator (=, !=, <, <=, >, >=, IN) after {token.text!r}, "
                f"found {operator.describe()}",
                operator.position,
            )
        self.take()
        op = "!=" if operator.text == "<>" else operator.text
        other = self.peek()
        if other.kind == "path":
            return self.compare_properties(subject, token, op, self.take())
        return self.compare(subject, op, operator.position, self.value())

    def compare_properties(self, subject: str, left: _Token, op: str, right: _Token) -> str:
        """Two JSON properties compared, as ``reported.fw != desired.fw``."""
        for token in (left, right):
            if token.text.lower() in _SCALARS:
                raise QueryError(
                    "only tags, desired and reported properties compare with each other",
                    token.position,
                )
        other = self.document(right)
        if op in ("=", "!="):
            return f"coalesce({subject} {'=' if op == '=' else '<>'} {other}, false)"
        return (
            f"coalesce(CASE WHEN jsonb_typeof({subject}) = 'number' "
            f"AND jsonb_typeof({other}) = 'number' "
            f"THEN ({subject})::numeric {op} ({other})::numeric "
            f"WHEN jsonb_typeof({subject}) = 'string' AND jsonb_typeof({other}) = 'string' "
            f"THEN ({subject} #>> '{{}}') COLLATE \"C\" {op} ({other} #>> '{{}}') END, false)"
        )

    def value(self) -> _Value:
        token = self.take()
        if token.kind == "string":
            return _Value("text", token.text[1:-1].replace("''", "'"), token.position)
        if token.kind == "number":
            try:
                number = Decimal(token.text)
            except ArithmeticError:  # an exponent beyond what Decimal holds
                raise QueryError(f"numbers go up to 1e{MAX_EXPONENT}", token.position) from None
            if number and abs(number.adjusted()) > MAX_EXPONENT:
                raise QueryError(f"numbers go up to 1e{MAX_EXPONENT}", token.position)
            return _Value("number", number, token.position)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return _Value("bool", token.text == "true", token.position)
        if token.kind == "keyword" and token.text == "null":
            return _Value("null", None, token.position)
        raise QueryError(
            f"expected a value ('text', a number, true, false or null), found {token.describe()}",
            token.position,
        )

    def membership(self, subject: str) -> str:
        """``subject IN (...)``; ``subject`` is id, status or a JSON property's SQL."""
        self.expect("punct", "(", "'(' after IN")
        values = [self.value()]
        while self.accept("punct", ","):
            values.append(self.value())
            if len(values) > MAX_IN_VALUES:
                raise QueryError(f"more than {MAX_IN_VALUES} values in IN", values[-1].position)
        self.expect("punct", ")", "',' or ')'")
        for value in values:
            if value.kind == "null":
                raise QueryError("null cannot be in an IN list: use = null", value.position)
        if subject == "gateway":
            flags = self.param([self.flag(v) for v in values], "bool[]")
            return f"((d.gateway IS NOT NULL) = ANY({flags}))"
        if subject == "parent":
            for value in values:
                self.check_id(value)
            names = [v.python for v in values]
            return f"coalesce(d.parent_id = ANY({self.param(names, 'text[]')}), false)"
        if subject not in ("id", "status"):
            texts = [_json_text(v) for v in values]
            return f"coalesce({subject} = ANY({self.param(texts, 'text[]')}::jsonb[]), false)"
        if subject == "status":
            online = {self.status(v) for v in values}
            if len(online) == 2:
                return "true"
            return self.status_sql(online.pop())
        for value in values:
            self.check_id(value)
        return f"(d.id = ANY({self.param([v.python for v in values], 'text[]')}))"

    def compare(self, subject: str, op: str, position: int, value: _Value) -> str:
        """``subject op value``; ``subject`` is id, status or a JSON property's SQL."""
        if subject == "status":
            if op not in ("=", "!="):
                raise QueryError("status takes = or != ('online' or 'offline')", position)
            online = self.status(value)
            return self.status_sql(online if op == "=" else not online)
        if subject == "gateway":
            if op not in ("=", "!="):
                raise QueryError("gateway takes = or != (true or false)", position)
            is_gateway = self.flag(value)
            return "(d.gateway IS NOT NULL)" if is_gateway == (op == "=") else "(d.gateway IS NULL)"
        if subject == "parent" and value.kind == "null":
            if op not in ("=", "!="):
                raise QueryError(f"null can only be compared with = or !=, not {op}", position)
            return "(d.parent_id IS NULL)" if op == "=" else "(d.parent_id IS NOT NULL)"
        if subject in ("id", "parent"):
            self.check_id(value)
            column = "d.id" if subject == "id" else "d.parent_id"
            collate = "" if op in ("=", "!=") else ' COLLATE "C"'
            # A device without a parent matches no comparison but = null.
            return f"coalesce({column}{collate} {op} {self.param(value.python, 'text')}, false)"
        document = subject
        if value.kind == "null":
            if op == "=":
                return f"({document} IS NULL OR {document} = 'null'::jsonb)"
            if op == "!=":
                return f"coalesce({document} <> 'null'::jsonb, false)"
            raise QueryError(f"null can only be compared with = or !=, not {op}", position)
        if op in ("=", "!="):
            literal = self.param(_json_text(value), "text")
            sql_op = "=" if op == "=" else "<>"
            return f"coalesce({document} {sql_op} {literal}::jsonb, false)"
        if value.kind == "number":
            number = self.param(str(value.python), "text")
            return (
                f"coalesce(CASE WHEN jsonb_typeof({document}) = 'number' "
                f"THEN ({document})::numeric END {op} {number}::numeric, false)"
            )
        if value.kind == "text":
            text = self.param(value.python, "text")
            return (
                f"coalesce(CASE WHEN jsonb_typeof({document}) = 'string' "
                f"THEN {document} #>> '{{}}' END COLLATE \"C\" {op} {text}, false)"
            )
        raise QueryError(f"{value.kind} values can only be compared with = or !=", position)

    def document(self, subject: _Token) -> str:
        """The SQL of a JSON property: its document, then the path as a parameter."""
        segments = _segments(subject)
        root = segments[0].lower()
        base = _DOCUMENTS.get(root)
        if base is None:
            if root in _SCALARS:
                raise QueryError(f"{segments[0]} has no members", subject.position)
            raise QueryError(
                f"unknown property {segments[0]!r}: use id, status, parent, gateway, "
                "tags.<name>, desired.<path> or reported.<path>",
                subject.position,
            )
        path = segments[1:]
        if not path:
            raise QueryError(
                f"{root} is a document: name a member, as in {root}.name", subject.position
            )
        if root == "tags":
            # Tags are flat and a tag name may hold dots: the rest is one name.
            return f"({base} -> {self.param('.'.join(path), 'text')})"
        if len(path) > MAX_PATH_SEGMENTS:
            raise QueryError(
                f"a path may have at most {MAX_PATH_SEGMENTS} members", subject.position
            )
        return f"({base} #> {self.param(path, 'text[]')})"

    @staticmethod
    def status(value: _Value) -> bool:
        if value.kind != "text" or value.python not in _STATUSES:
            raise QueryError("status is 'online' or 'offline'", value.position)
        return _STATUSES[value.python]

    @staticmethod
    def status_sql(online: bool) -> str:
        return "coalesce(a.online, false)" if online else "NOT coalesce(a.online, false)"

    @staticmethod
    def check_id(value: _Value) -> None:
        if value.kind != "text":
            raise QueryError("a device id is text: write it as 'id'", value.position)

    @staticmethod
    def flag(value: _Value) -> bool:
        if value.kind != "bool":
            raise QueryError("gateway is true or false", value.position)
        return bool(value.python)


def _segments(token: _Token) -> list[str]:
    """The path's members, quotes removed (the tokenizer has checked the shape)."""
    root, _, rest = token.text.partition(".")
    segments = [root]
    for match in _SEGMENT.finditer(rest):
        segment = match.group()
        if segment.startswith('"'):
            segment = segment[1:-1].replace('""', '"')
        segments.append(segment)
    return segments


def _json_text(value: _Value) -> str:
    """The value as JSON text (numbers exactly as written, in JSON's syntax)."""
    if value.kind == "number":
        return str(value.python)
    return orjson.dumps(value.python).decode()


def compile_query(text: str, *, first_param: int = 1) -> Compiled:
    """The SQL condition (over :data:`DEVICE_FROM`) of a query; parameters are numbered
    from ``first_param``. An empty query matches every device."""
    if len(text) > MAX_QUERY_LENGTH:
        raise QueryError(f"a query may be at most {MAX_QUERY_LENGTH} characters", MAX_QUERY_LENGTH)
    compiler = _Compiler(_tokens(text), first_param)
    where = compiler.query()
    return Compiled(text, where, compiler.params)
