"""Parsing devices' acknowledgements of cloud-to-device messages (fleetline.protocol)."""

from __future__ import annotations

import uuid

import orjson
import pytest

from fleetline.protocol import PayloadError, parse_c2d_ack

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
