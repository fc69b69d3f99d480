"""X.509 device identities on the real broker over TLS, registered through the API.

Certificates and CAs are made in the test. A self-signed device logs in with a
certificate whose thumbprint is registered (primary or secondary); a CA-signed device
with one whose common name is its id, signed by a CA verified by proof of possession.
Every refusal is checked at the broker (no CONNACK, or Not authorized) and in the reason
it logged; removing a thumbprint or a CA, or disabling the device, disconnects it.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from fleetline import certificates
from fleetline_dev.certs import cert_pem, issue, make_ca, self_signed
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.conftest import Identity
from tests.integration.test_api import assert_problem
from tests.integration.test_broker_auth import Client, log_has, wait_for

pytestmark = pytest.mark.integration

def connect(broker: LocalMosquitto, device_id: str, tls: ssl.SSLContext,
            password: str | None = None) -> Client:
    return Client(broker, device_id, device_id, password, tls=tls)


def assert_refused_for(client: Client, broker: LocalMosquitto, device_id: str,
                       reason: str) -> None:
    assert not client.ok, f"{device_id} was let in"
    assert log_has(broker, f"refused login of username '{device_id}'"), "no refusal logged"
    lines = [line for line in broker.log_path.read_text(errors="replace").splitlines()
             if f"refused login of username '{device_id}'" in line]
    assert reason in lines[-1], lines[-1]


def thumb(cert: x509.Certificate) -> str:
    return certificates.thumbprint(cert).hex()


def create_device(rest: httpx.Client, device_id: str, **auth: Any) -> dict[str, Any]:
    response = rest.post("/v1/devices", json={"id": device_id, "auth": auth or {"type": "key"}})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def verified_ca(rest: httpx.Client, name: str, folder: Path) -> Identity:
    ca, ca_key = make_ca(folder, name=f"{name} devices")
    created = rest.post("/v1/cas", json={"name": name, "certificate": cert_pem(ca).decode()})
    assert created.status_code == 201, created.text
    code = created.json()["verification_code"]
    proof, _ = issue(ca, ca_key, code, client=True)
    verified = rest.post(f"/v1/cas/{name}/verify", json={"certificate": cert_pem(proof).decode()})
    assert verified.status_code == 200, verified.text
    assert verified.json()["verified"] and verified.json()["verification_code"] is None
    return ca, ca_key


def test_self_signed_device_logs_in_by_thumbprint_and_rotates(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str,
) -> None:
    primary, secondary, stranger = (self_signed(uid) for _ in range(3))
    body = create_device(rest, uid, type="x509_self_signed", primary_thumbprint=thumb(primary[0]))
    assert body["credentials"] is None
    assert body["auth"] == {"type": "x509_self_signed", "primary_thumbprint": thumb(primary[0]),
                            "secondary_thumbprint": None, "ca": None}
    device = connect(secure_broker, uid, tls_for(primary))
    assert device.ok, device.connack
    device.subscribe(f"devices/{uid}/c2d")
    device.publish(f"devices/{uid}/telemetry", b'{"t": 1}')

    # Same common name, another key: not its certificate. No certificate: refused.
    assert_refused_for(connect(secure_broker, uid, tls_for(stranger)), secure_broker, uid,
                       "certificate thumbprint not registered")
    assert_refused_for(connect(secure_broker, uid, tls_for(), "a password"), secure_broker, uid,
                       "no client certificate")

    # Rotation: the secondary is added (the primary stays connected), then the primary is
    # removed: its session goes within seconds and it is refused from then on.
    colons = ":".join(f"{b:02X}" for b in certificates.thumbprint(secondary[0]))
    response = rest.put(f"/v1/devices/{uid}/auth", json={
        "type": "x509_self_signed", "primary_thumbprint": thumb(primary[0]),
        "secondary_thumbprint": colons})
    assert response.status_code == 200, response.text
    assert response.json()["auth"]["secondary_thumbprint"] == thumb(secondary[0])
    rotated = connect(secure_broker, f"{uid}", tls_for(secondary))
    assert rotated.ok, rotated.connack
    rotated.close()
    device = connect(secure_broker, uid, tls_for(primary))
    assert device.ok
    rest.put(f"/v1/devices/{uid}/auth", json={
        "type": "x509_self_signed", "primary_thumbprint": thumb(secondary[0])})
    assert device.disconnected.wait(10), "the removed thumbprint's session stayed"
    assert_refused_for(connect(secure_broker, uid, tls_for(primary)), secure_broker, uid,
                       "certificate thumbprint not registered")
    again = connect(secure_broker, uid, tls_for(secondary))
    assert again.ok
    again.close()
    # A key device's credentials are not for it.
    assert_problem(rest.post(f"/v1/devices/{uid}/token"), 409)
    assert_problem(rest.post(f"/v1/devices/{uid}/key"), 409)


def test_ca_signed_device_needs_a_verified_ca_and_its_own_name(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str, tmp_path: Path,
) -> None:
    ca, ca_key = make_ca(tmp_path / "ca", name=f"{uid} devices")
    created = rest.post("/v1/cas", json={"name": uid, "certificate": cert_pem(ca).decode()})
    assert created.status_code == 201, created.text
    code = created.json()["verification_code"]
    assert created.json()["verified"] is False and len(code) == 32
    assert_problem(rest.post("/v1/cas", json={"name": f"{uid}-2",
                                              "certificate": cert_pem(ca).decode()}), 409)
    create_device(rest, uid, type="x509_ca", ca=uid)
    device_cert = issue(ca, ca_key, uid, client=True)

    # Not trusted before it is verified.
    assert_refused_for(connect(secure_broker, uid, tls_for(device_cert)), secure_broker, uid,
                       "the device's CA is not (or no longer) verified")
    # A proof with another name, or signed by another key, verifies nothing.
    impostor, impostor_key = make_ca(tmp_path / "impostor", name=f"{uid} devices")
    for proof, why in [
        (issue(ca, ca_key, "not-the-code", client=True)[0], "common name"),
        (issue(ca, impostor_key, code, client=True)[0], "not signed by the CA"),
    ]:
        refused = rest.post(f"/v1/cas/{uid}/verify", json={"certificate": cert_pem(proof).decode()})
        assert_problem(refused, 400)
        assert why in refused.json()["detail"]
    proof, _ = issue(ca, ca_key, code, client=True)
    verified = rest.post(f"/v1/cas/{uid}/verify", json={"certificate": cert_pem(proof).decode()})
    assert verified.status_code == 200 and verified.json()["verified"], verified.text

    device = wait_for(lambda: (c := connect(secure_broker, uid, tls_for(device_cert))).ok and c,
                      what="the CA-signed device's login")
    # Signed by the CA for another device id; a forgery that names the CA as issuer.
    assert_refused_for(connect(secure_broker, uid, tls_for(issue(ca, ca_key, f"{uid}-x",
                                                               client=True))),
                       secure_broker, uid, "certificate common name is not the device id")
    forged = issue(impostor, impostor_key, uid, client=True)
    assert forged[0].issuer == ca.subject
    assert_refused_for(connect(secure_broker, uid, tls_for(forged)), secure_broker, uid,
                       "certificate not signed by the device's CA")
    # Another verified CA vouches only for its own devices, not this one.
    other, other_key = verified_ca(rest, f"{uid}-b", tmp_path / "b")
    assert_refused_for(connect(secure_broker, uid, tls_for(issue(other, other_key, uid,
                                                                 client=True))),
                       secure_broker, uid, "certificate not signed by the device's CA")

    assert rest.delete(f"/v1/cas/{uid}").status_code == 204
    assert device.disconnected.wait(10), "the deleted CA's device stayed connected"
    assert log_has(secure_broker, "the CA of its certificate was removed")
    assert_refused_for(connect(secure_broker, uid, tls_for(device_cert)), secure_broker, uid,
                       "the device's CA is not (or no longer) verified")


def test_disabled_device_is_disconnected_and_refused(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str,
) -> None:
    # A key device over TLS: the broker asks for a certificate, the device has none.
    key = create_device(rest, uid)["credentials"]["key"]
    device = connect(secure_broker, uid, tls_for(), key)
    assert device.ok, device.connack
    response = rest.patch(f"/v1/devices/{uid}", json={"enabled": False})
    assert response.status_code == 200 and response.json()["enabled"] is False, response.text
    assert device.disconnected.wait(10), "the disabled device stayed connected"
    assert_refused_for(connect(secure_broker, uid, tls_for(), key), secure_broker, uid,
                       "device disabled")
    assert rest.patch(f"/v1/devices/{uid}", json={"enabled": True}).status_code == 200
    again = wait_for(lambda: (c := connect(secure_broker, uid, tls_for(), key)).ok and c,
                     what="the enabled device's login")
    again.close()


def test_a_key_retired_by_a_certificate_does_not_come_back(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str,
) -> None:
    old_key = create_device(rest, uid)["credentials"]["key"]
    cert = self_signed(uid)
    rest.put(f"/v1/devices/{uid}/auth", json={"type": "x509_self_signed",
                                               "primary_thumbprint": thumb(cert[0])})
    back = rest.put(f"/v1/devices/{uid}/auth", json={"type": "key"})
    assert back.status_code == 200 and back.json()["key_version"] == 0, back.text
    assert_refused_for(connect(secure_broker, uid, tls_for(), old_key), secure_broker, uid,
                       "no key issued")
    new_key = rest.post(f"/v1/devices/{uid}/key").json()["key"]
    assert new_key != old_key
    device = wait_for(lambda: (c := connect(secure_broker, uid, tls_for(), new_key)).ok and c,
                      what="the new key's login")
    device.close()


def test_expired_or_not_yet_valid_certificate_fails_the_handshake(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_for: Callable[..., ssl.SSLContext],
    uid: str, tmp_path: Path,
) -> None:
    ca, ca_key = verified_ca(rest, uid, tmp_path)
    create_device(rest, uid, type="x509_ca", ca=uid)
    now = dt.datetime.now(dt.UTC)
    for start, why in [(now - dt.timedelta(days=3), "certificate has expired"),
                       (now + dt.timedelta(days=1), "certificate is not yet valid")]:
        cert = issue(ca, ca_key, uid, client=True, days=1, not_before=start)
        refused = connect(secure_broker, uid, tls_for(cert))
        assert not refused.ok
        assert log_has(secure_broker, why), why


def test_rest_refuses_bad_certificates_and_thumbprints(rest: httpx.Client, uid: str) -> None:
    leaf, _ = self_signed(uid)
    assert "not a CA certificate" in assert_problem(
        rest.post("/v1/cas", json={"name": uid, "certificate": cert_pem(leaf).decode()}), 400
    )["detail"]
    assert_problem(rest.post("/v1/cas", json={"name": uid, "certificate": "garbage"}), 400)
    assert_problem(rest.post(f"/v1/cas/{uid}-none/verify",
                             json={"certificate": cert_pem(leaf).decode()}), 404)
    for auth in [{"type": "x509_self_signed"},
                 {"type": "x509_self_signed", "primary_thumbprint": "ab" * 31},
                 {"type": "key", "primary_thumbprint": thumb(leaf)},
                 {"type": "x509_ca", "ca": uid, "secondary_thumbprint": thumb(leaf)},
                 {"type": "x509_ca"}, {"type": "pgp"}]:
        assert_problem(rest.post("/v1/devices", json={"id": uid, "auth": auth}), 422)
    assert_problem(rest.put(f"/v1/devices/{uid}-none/auth", json={"type": "key"}), 404)
    assert "not registered" in assert_problem(
        rest.post("/v1/devices", json={"id": uid, "auth": {"type": "x509_ca", "ca": f"{uid}-no"}}),
        400)["detail"]
