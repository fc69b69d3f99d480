"""Self-provisioning through enrollments, on the real broker over TLS and the API.

A device registers itself from a symmetric-key group (over MQTT and over REST) and from
an X.509 group (over MQTT), then logs in with what it was given and publishes. Each
refusal is checked where the device sees it (CONNACK, problem+json, the answer's error)
and where the operator does (the broker's log, the registrations).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetline import devicekeys
from fleetline_dev.certs import issue
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem
from tests.integration.test_broker_auth import Client, log_has, wait_for
from tests.integration.test_x509 import assert_refused_for, verified_ca
from tests.support import ApiProcess

pytestmark = pytest.mark.integration


def enroll(rest: httpx.Client, enrollment_id: str, **fields: Any) -> dict[str, Any]:
    response = rest.post("/v1/enrollments", json={"id": enrollment_id, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def provision_over_mqtt(broker: LocalMosquitto, enrollment: str, registration: str,
                        context: ssl.SSLContext, password: str | None = None
                        ) -> tuple[Client, dict[str, Any] | None]:
    """Log in to provision and register; the client and the answer (None: refused)."""
    login = f"$provision/{enrollment}/{registration}"
    c = Client(broker, login, login, password, tls=context)
    if not c.ok:
        return c, None
    base = f"provisioning/{enrollment}/{registration}"
    c.subscribe(f"{base}/res")
    c.publish(f"{base}/register", json.dumps({"rid": 7}).encode())
    wait_for(lambda: c.messages, what="the provisioning answer")
    answer: dict[str, Any] = json.loads(c.messages.pop()[1])
    return c, answer


def group_token(group_key: str, registration: str, ttl: int = 300) -> str:
    key = devicekeys.registration_key(group_key, registration)
    return devicekeys.sas_token(key, registration, ttl_seconds=ttl)[0]


def test_symmetric_group_over_mqtt(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str,
) -> None:
    group = enroll(rest, uid, kind="group", attestation="symmetric_key",
                   registration_pattern=f"{uid}-[0-9]+", initial_tags={"site": "north"},
                   initial_desired={"interval_s": 5})
    group_key = group["key"]
    registration = f"{uid}-1"
    started = time.monotonic()
    c, answer = provision_over_mqtt(secure_broker, uid, registration, tls_for(),
                                    group_token(group_key, registration))
    assert answer is not None and answer["status"] == "assigned", answer
    assert answer["rid"] == 7 and answer["device_id"] == registration
    assert answer["mqtt_url"] == secure_broker.tls_url
    key = answer["auth"]["key"]
    # Its own topics only, never a device's.
    denied = f"devices/{registration}/telemetry"
    c.client.publish(denied, b"{}", qos=1).wait_for_publish(5)
    assert log_has(secure_broker, f"to '{denied}': not its own provisioning topics")
    c.close()

    device = Client(secure_broker, registration, registration, key, tls=tls_for())
    assert device.ok, device.connack
    device.publish(f"devices/{registration}/telemetry", b'{"values": {"t": 1}}')
    device.close()
    assert time.monotonic() - started < 10
    shown = rest.get(f"/v1/devices/{registration}").json()
    assert shown["tags"] == {"site": "north"}
    assert rest.get(f"/v1/devices/{registration}/twin").json()["desired"] == {"interval_s": 5}

    # Idempotent: the same device and key come back; the operation can be polled.
    c, again = provision_over_mqtt(secure_broker, uid, registration, tls_for(), key_of(group_key,
                                                                               registration))
    assert again is not None and again["device_id"] == registration
    assert again["auth"]["key"] == key and again["operation_id"] != answer["operation_id"]
    base = f"provisioning/{uid}/{registration}"
    c.publish(f"{base}/status", json.dumps({"operation_id": again["operation_id"]}).encode())
    wait_for(lambda: c.messages, what="the status answer")
    assert json.loads(c.messages.pop()[1])["device_id"] == registration
    c.close()
    registrations = rest.get(f"/v1/enrollments/{uid}/registrations").json()["items"]
    assert [(r["registration_id"], r["status"], r["attempts"]) for r in registrations] == [
        (registration, "assigned", 2)]
    assert rest.get(f"/v1/enrollments/{uid}").json()["registrations"] == 1

    # Refused at login: another group's key, an id outside the pattern, a disabled group.
    other = f"{uid}-2"
    wrong = devicekeys.enrollment_key(b"x" * 32, uid, 1)
    assert_refused_for(provision_over_mqtt(secure_broker, uid, other, tls_for(),
                                           group_token(wrong, other))[0],
                       secure_broker, f"$provision/{uid}/{other}", "bad token signature")
    outside = f"{uid}-x"
    assert_refused_for(provision_over_mqtt(secure_broker, uid, outside, tls_for(),
                                           group_token(group_key, outside))[0],
                       secure_broker, f"$provision/{uid}/{outside}",
                       "outside the enrollment's pattern")
    assert rest.patch(f"/v1/enrollments/{uid}", json={"enabled": False}).status_code == 200
    assert_refused_for(provision_over_mqtt(secure_broker, uid, other, tls_for(),
                                           group_token(group_key, other))[0],
                       secure_broker, f"$provision/{uid}/{other}", "enrollment disabled")


def test_a_provisioning_login_never_takes_over_a_device_session(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str,
) -> None:
    """Its client id is "$provision/<enrollment>/<id>", never the device's own: logging in
    to provision a connected device's id leaves that device connected."""
    group_key = enroll(rest, uid, kind="group", attestation="symmetric_key")["key"]
    registration = f"{uid}-1"
    c, answer = provision_over_mqtt(secure_broker, uid, registration, tls_for(),
                                    group_token(group_key, registration))
    assert answer is not None and answer["status"] == "assigned"
    c.close()
    device = Client(secure_broker, registration, registration, answer["auth"]["key"],
                    tls=tls_for())
    assert device.ok
    again, _ = provision_over_mqtt(secure_broker, uid, registration, tls_for(),
                                   group_token(group_key, registration))
    again.close()
    time.sleep(0.5)
    assert not device.disconnected.is_set(), "the device's session was taken over"
    device.close()


def key_of(group_key: str, registration: str) -> str:
    return devicekeys.registration_key(group_key, registration)


def test_x509_group_over_mqtt(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str, tmp_path: Path,
) -> None:
    ca, ca_key = verified_ca(rest, uid, tmp_path)
    enroll(rest, uid, kind="group", attestation="x509", ca=uid)
    registration = f"{uid}-cam"
    identity = issue(ca, ca_key, registration, client=True)
    c, answer = provision_over_mqtt(secure_broker, uid, registration, tls_for(identity))
    assert answer is not None and answer["status"] == "assigned", answer
    assert answer["auth"] == {"type": "x509_ca"}
    c.close()
    device = Client(secure_broker, registration, registration, None, tls=tls_for(identity))
    assert device.ok, device.connack
    device.close()
    # Another name than the registration id; no certificate.
    stranger = issue(ca, ca_key, f"{uid}-other", client=True)
    assert_refused_for(provision_over_mqtt(secure_broker, uid, registration, tls_for(stranger))[0],
                       secure_broker, f"$provision/{uid}/{registration}",
                       "certificate common name is not the registration id")
    assert_refused_for(provision_over_mqtt(secure_broker, uid, registration, tls_for(), "k")[0],
                       secure_broker, f"$provision/{uid}/{registration}", "no client certificate")
    # The CA of an enrollment stays while the enrollment does.
    assert_problem(rest.delete(f"/v1/cas/{uid}"), 409)


def provision_rest(api: ApiProcess, enrollment: str, registration: str,
                   token: str | None) -> httpx.Response:
    headers = {"Authorization": f"SharedAccessSignature {token}"} if token else {}
    return httpx.post(f"{api.url}/v1/provision", headers=headers, timeout=10,
                      json={"enrollment_id": enrollment, "registration_id": registration})


def test_provisioning_over_rest(
    rest: httpx.Client, secure_api: ApiProcess, secure_broker: LocalMosquitto,
    tls_for: Callable[..., ssl.SSLContext], uid: str,
) -> None:
    group_key = enroll(rest, uid, kind="group", attestation="symmetric_key",
                       registration_pattern=f"{uid}-[a-z]+", reprovision="reset",
                       initial_tags={"fw": "1"})["key"]
    registration = f"{uid}-a"
    answer = provision_rest(secure_api, uid, registration, group_token(group_key, registration))
    assert answer.status_code == 200, answer.text
    assert answer.json()["auth"]["type"] == "key"
    device = Client(secure_broker, registration, registration, answer.json()["auth"]["key"],
                    tls=tls_for())
    assert device.ok, device.connack
    device.close()
    # Reset on reprovisioning: its tags go back to the enrollment's.
    rest.patch(f"/v1/devices/{registration}", json={"tags": {"fw": "2", "x": "y"}})
    assert provision_rest(secure_api, uid, registration,
                          group_token(group_key, registration)).status_code == 200
    assert rest.get(f"/v1/devices/{registration}").json()["tags"] == {"fw": "1"}

    # Credentials: none, expired, signed for another id, the raw key: one answer, 401.
    other = f"{uid}-b"
    expired = devicekeys.sas_token(key_of(group_key, other), other, ttl_seconds=1,
                                   now=time.time() - 10)[0]
    for token in [None, expired, group_token(group_key, registration),
                  key_of(group_key, other)]:
        refused = provision_rest(secure_api, uid, other, token)
        assert_problem(refused, 401, "refused")
    # The enrollment refuses: outside its pattern, a device registered by hand.
    outside = f"{uid}-1"
    assert_problem(provision_rest(secure_api, uid, outside, group_token(group_key, outside)),
                   403, "outside the enrollment's pattern")
    by_hand = f"{uid}-hand"
    assert rest.post("/v1/devices", json={"id": by_hand}).status_code == 201
    assert_problem(provision_rest(secure_api, uid, by_hand, group_token(group_key, by_hand)),
                   403, "registered outside this enrollment")
    failed = {r["registration_id"]: r for r in
              rest.get(f"/v1/enrollments/{uid}/registrations").json()["items"]}
    assert failed[by_hand]["status"] == "failed" and "outside" in failed[by_hand]["error"]


def test_a_provisioning_flood_is_told_to_wait(
    rest: httpx.Client, secure_api: ApiProcess, uid: str
) -> None:
    group_key = enroll(rest, uid, kind="group", attestation="symmetric_key")["key"]
    codes = []
    for n in range(12):
        registration = f"{uid}-{n}"
        response = provision_rest(secure_api, uid, registration,
                                  group_token(group_key, registration))
        codes.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert_problem(response, 429, "registrations a second")
    # The test API allows bursts of 5 per enrollment, then one a second.
    assert codes[:5] == [200] * 5 and codes.count(429) >= 5, codes
    # Another enrollment is not held up by this one's flood.
    calm = enroll(rest, f"{uid}-calm", kind="individual", attestation="symmetric_key")
    token = devicekeys.sas_token(calm["key"], f"{uid}-calm")[0]
    assert provision_rest(secure_api, f"{uid}-calm", f"{uid}-calm", token).status_code == 200


def test_enrollment_validation(rest: httpx.Client, uid: str) -> None:
    for body, status in [
        ({"kind": "group", "attestation": "x509"}, 400),  # no CA
        ({"kind": "group", "attestation": "x509", "ca": f"{uid}-none"}, 400),
        ({"kind": "individual", "attestation": "x509"}, 400),  # no thumbprint
        ({"kind": "group", "attestation": "symmetric_key", "registration_pattern": "(["}, 400),
        ({"kind": "group", "attestation": "symmetric_key",
          "initial_desired": {"$bad": 1}}, 400),
        ({"kind": "cohort", "attestation": "symmetric_key"}, 422),
    ]:
        assert_problem(rest.post("/v1/enrollments", json={"id": uid, **body}), status)
    enroll(rest, uid, kind="individual", attestation="symmetric_key")
    assert_problem(rest.post("/v1/enrollments", json={"id": uid, "kind": "individual",
                                                      "attestation": "symmetric_key"}), 409)
    renewed = rest.post(f"/v1/enrollments/{uid}/key")
    assert renewed.status_code == 200 and renewed.json()["key"], renewed.text
    assert rest.delete(f"/v1/enrollments/{uid}").status_code == 204
    assert_problem(rest.get(f"/v1/enrollments/{uid}"), 404)


async def test_failed_rest_attempts_from_one_address_are_throttled(
    secure_api: ApiProcess, uid: str
) -> None:
    """A guesser is told to wait after the allowed failures (20 in this test API; 10 by
    default), without its guesses being checked, also when it sends them all at once (a
    failure is counted before the check); one failure a second comes back. Last in this
    file: it spends the address's failures."""

    async def guess(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.post("/v1/provision", headers={
            "Authorization": "SharedAccessSignature sig=x&se=1"},
            json={"enrollment_id": uid, "registration_id": f"{uid}-{n}"})

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=secure_api.url, timeout=30,
                                 limits=httpx.Limits(max_connections=40)) as client:
        answers = await asyncio.gather(*(guess(client, n) for n in range(40)))
    elapsed = time.monotonic() - started
    codes = [a.status_code for a in answers]
    assert set(codes) == {401, 429}, codes
    # The burst, and at most one more failure for each second the guesses took.
    assert codes.count(401) <= 20 + int(elapsed) + 1, (codes, elapsed)
    refused = next(a for a in answers if a.status_code == 429)
    assert_problem(refused, 429, "failed provisioning attempts")
    assert int(refused.headers["Retry-After"]) >= 1
    # Spent: the next guess waits, a second later one is checked again.
    assert provision_rest(secure_api, uid, uid, "sig=x&se=1").status_code == 429
    time.sleep(1.1)
    assert provision_rest(secure_api, uid, uid, "sig=x&se=1").status_code == 401
