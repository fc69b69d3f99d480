"""Parsing devices' acknowledgements of cloud-to-device messages, and the JSON checks
that twin patches and message bodies share (fleetline.protocol)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from fleetline.protocol import (
    JsonProblem,
    PayloadError,
    json_problem,
    parse_c2d_ack,
    twin_patch_problem,
)
from fleetline_api.schemas.messages import MAX_BODY_DEPTH, BodyError, encode_body

MESSAGE_ID = "0b6f1c2e-5d4a-4f7e-9c1b-2a3d4e5f6a7b"


@pytest.mark.parametrize("outcome", ["complete", "reject"])
def test_an_ack_gives_the_canonical_id_and_its_outcome(outcome: str) -> None:
    assert parse_c2d_ack(orjson.dumps({"id": MESSAGE_ID, "outcome": outcome})) == (
        MESSAGE_ID,
        outcome,
    )


def test_any_spelling_of_the_uuid_is_the_same_message_and_extra_members_are_ignored() -> None:
    spelled = uuid.UUID(MESSAGE_ID).hex.upper()
    payload = orjson.dumps({"id": spelled, "outcome": "reject", "reason": "busy"})
    assert parse_c2d_ack(payload) == (MESSAGE_ID, "reject")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'"complete"', "must be a JSON object"),
        (b'{"outcome": "complete"}', "'id' must be the message id"),
        (b'{"id": 7, "outcome": "complete"}', "'id' must be the message id"),
        (b'{"id": "nope", "outcome": "complete"}', "is not a message id (a UUID)"),
        (orjson.dumps({"id": MESSAGE_ID}), "'outcome' must be 'complete' or 'reject'"),
        (orjson.dumps({"id": MESSAGE_ID, "outcome": "Complete"}), "'outcome' must be"),
        (orjson.dumps({"id": MESSAGE_ID, "outcome": ["complete"]}), "'outcome' must be"),
        (orjson.dumps({"id": MESSAGE_ID, "outcome": "complete", "x": "y" * 1100}), "exceeds 1024"),
    ],
)
def test_a_bad_ack_raises_with_the_dead_letter_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=None) as caught:
        parse_c2d_ack(payload)
    assert reason in str(caught.value)


def test_json_problem_finds_the_first_problem_in_document_order() -> None:
    deep: Any = 1
    for _ in range(3):
        deep = [deep]
    assert json_problem({"a": 1, "b": ["x", {"c": deep}]}, max_depth=4) == JsonProblem(
        "too_deep", "b[1].c[0]"
    )
    assert json_problem({"a": "n\x00l", "b": deep}, max_depth=2) == JsonProblem("nul", "a")
    assert json_problem({"a": {"k\x00": 1}}, max_depth=8, path="body") == JsonProblem(
        "member_name", "body.a", "k\x00"
    )
    # A member's name is checked before its value, as a reader meets them.
    assert json_problem({"x": "\x00", "y": 1}, max_depth=8, key_ok=lambda k: k != "x") == (
        JsonProblem("member_name", "", "x")
    )
    assert json_problem(["ok", 1, None, {"a": [True]}], max_depth=3) is None
    assert json_problem("\x00", max_depth=1) == JsonProblem("nul", "")


def test_json_problem_walks_any_depth_without_recursion() -> None:
    deep: Any = "end"
    for _ in range(100_000):
        deep = {"a": deep}
    assert json_problem(deep, max_depth=200_000) is None
    problem = json_problem(deep, max_depth=50)
    assert problem is not None and problem.kind == "too_deep"
    assert problem.path == ".".join(["a"] * 50)


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"a.b": 1}, "member name 'a.b' must be 1-128 characters without '.', '$', whitespace"),
        ({"a": {"$x": 1}}, "member name a.'$x' must be 1-128 characters"),
        ({"a": [1, "z\x00"]}, "a[1] contains a NUL character"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": []}}}}}}}},
         "a.b.c.d.e.f.g.h is nested more than 8 levels deep"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}, None),
        ([1], "a twin patch must be a JSON object"),
    ],
)
def test_twin_patches_keep_their_problems(doc: Any, problem: str | None) -> None:
    found = twin_patch_problem(doc)
    assert found == problem if problem is None else (found or "").startswith(problem), found


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"a": ["ok", "n\x00"]}, "body.a[1] contains a NUL character"),
        ({"a": {"k\x00": 1}}, "a member name in body.a contains a NUL character"),
        ("\x00", "body contains a NUL character"),
    ],
)
def test_message_bodies_keep_their_problems(body: Any, problem: str) -> None:
    with pytest.raises(BodyError) as caught:
        encode_body(body)
    assert str(caught.value) == problem


def test_a_message_body_deeper_than_the_limit_is_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_BODY_DEPTH):
        deep = [deep]
    assert encode_body(deep) == "[" * MAX_BODY_DEPTH + "1" + "]" * MAX_BODY_DEPTH
    with pytest.raises(BodyError, match=f"the body is nested more than {MAX_BODY_DEPTH} levels"):
        encode_body([deep])
