"""The device query compiler: what it refuses, and where it says the error is.

What the compiled SQL matches is tested against PostgreSQL in
tests/integration/test_query.py."""

from __future__ import annotations

import orjson
import pytest

from fleetline.devicequery import MAX_QUERY_LENGTH, QueryError, compile_query


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_an_empty_query_matches_everything(text: str) -> None:
    compiled = compile_query(text)
    assert compiled.where == "true" and compiled.params == []


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("tags.site =", 11, "expected a value"),
        ("tags.site = 'A' AND", 19, "expected a property"),
        ("foo = 1", 0, "unknown property 'foo'"),
        ("tags = 'A'", 0, "tags is a document"),
        ("reported = 1", 0, "reported is a document"),
        ("id.x = 'a'", 0, "id has no members"),
        ("status < 'online'", 7, "status takes = or !="),
        ("status = 'away'", 9, "'online' or 'offline'"),
        ("id = 5", 5, "a device id is text"),
        ("(tags.a = 1", 11, "expected ')'"),
        ("tags.a = 1)", 10, "expected AND, OR or the end"),
        ("tags.a = 'x' 'y'", 13, "expected AND, OR or the end"),
        ("tags.a 'x'", 7, "expected an operator"),
        ("tags.a = 'open", 9, "unterminated 'string'"),
        ("tags.a = 1 ; DROP TABLE devices", 11, "unexpected character ';'"),
        ("reported.on < true", 12, "bool values can only be compared with = or !="),
        ("reported.x > null", 11, "null can only be compared with = or !="),
        ("tags.a IN (1, null)", 14, "null cannot be in an IN list"),
        ("tags.a IN 1", 10, "'(' after IN"),
        ("tags.a NOT = 1", 11, "IN after NOT"),
        ("reported.x > 1e400", 13, "numbers go up to"),
        ("reported.x = 1e999999999999999999999", 13, "numbers go up to"),
        ("reported.x = 0e99999999999999999999999", 13, "numbers go up to"),
        ("tags.a = 'a\x00b'", 11, "U+0000 is not allowed"),
        ("tags.a IN ('\udfff')", 12, "U+DFFF is not allowed"),
        ('reported."a\ud800".b = 1', 11, "U+D800 is not allowed"),
        ("reported.a.b.c.d.e.f.g.h.i = 1", 0, "at most 8 members"),
        ("NOT", 3, "expected a property"),
        ("id = reported.fw", 0, "only tags, desired and reported properties compare"),
        ("reported.fw = status", 14, "only tags, desired and reported properties compare"),
        ("reported.fw = colour.x", 14, "unknown property 'colour'"),
        ("gateway = 'yes'", 10, "gateway is true or false"),
        ("gateway > true", 8, "gateway takes = or !="),
        ("gateway IN (1)", 12, "gateway is true or false"),
        ("parent = 5", 9, "a device id is text"),
        ("parent < null", 7, "null can only be compared with = or !="),
        ("parent.x = 'a'", 0, "parent has no members"),
    ],
)
def test_errors_say_what_and_where(text: str, position: int, message: str) -> None:
    with pytest.raises(QueryError) as caught:
        compile_query(text)
    assert caught.value.position == position, caught.value
    assert message in caught.value.message
    assert f"(at position {position})" in str(caught.value)


def test_limits_on_length_nesting_and_size() -> None:
    with pytest.raises(QueryError, match="at most 4096 characters"):
        compile_query("tags.a = '" + "x" * MAX_QUERY_LENGTH + "'")
    with pytest.raises(QueryError, match="nested more than 32"):
        compile_query("(" * 40 + "tags.a = 1" + ")" * 40)
    with pytest.raises(QueryError, match="nested more than 32"):
        compile_query("NOT " * 40 + "tags.a = 1")
    with pytest.raises(QueryError, match="more than 100 comparisons"):
        compile_query(" OR ".join(["tags.a = 1"] * 101))
    with pytest.raises(QueryError, match="more than 1000 values"):
        compile_query("tags.a IN (" + ", ".join(["1"] * 1001) + ")")


@pytest.mark.parametrize(
    "value",
    ["x'); DROP TABLE devices; --", "' OR 1=1 --", "$9::text", "\\", '"quoted"'],
)
def test_values_travel_as_parameters(value: str) -> None:
    literal = "'" + value.replace("'", "''") + "'"
    compiled = compile_query(f"tags.site = {literal} OR id = {literal}")
    assert value not in compiled.where
    assert "DROP" not in compiled.where
    assert orjson.dumps(value).decode() in compiled.params  # JSON text, for the tag
    assert value in compiled.params  # the id, as text


def test_paths_and_names_travel_as_parameters() -> None:
    compiled = compile_query(
        "reported.\"a b\".c = 1 AND tags.site.floor:2 = 'x' AND desired.\"x\"\"y\" = 2",
        first_param=3,
    )
    assert compiled.params[0] == ["a b", "c"]
    assert compiled.params[2] == "site.floor:2"  # a tag name may hold dots
    assert compiled.params[4] == ['x"y']
    assert "$3::" in compiled.where and "$8::" in compiled.where and "$9" not in compiled.where
    assert "a b" not in compiled.where and "site" not in compiled.where


def test_keywords_in_any_case_and_operator_spellings() -> None:
    lower = compile_query("tags.a = 1 and not tags.b in (2, 3) or status <> 'online'")
    upper = compile_query("tags.a = 1 AND NOT tags.b IN (2, 3) OR status != 'online'")
    assert lower == type(lower)(lower.text, upper.where, upper.params) and lower.text != upper.text
