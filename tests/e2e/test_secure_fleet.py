"""The system as `fleetline up` runs it: devices on the broker's TLS listener (verified
against the local CA), services on the plain loopback one; the broker checks device keys
and service accounts, a device registered over REST publishes over TLS with the
connection string it was shown, and a renewed key locks the old one out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.conftest import wait_rows
from tests.support import DEVICE_KEY_SECRET, ApiProcess, Device, IngestProcess, wait_until

pytestmark = pytest.mark.integration
SERVICES = {"fleetline-ingest": "ingest-pw", "fleetline-api": "api-pw"}


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, tls_files: TlsFiles
) -> Iterator[LocalMosquitto]:
    auth = BrokerAuth(database_url, DEVICE_KEY_SECRET.encode(), services=SERVICES)
    with LocalMosquitto(tmp_path_factory.mktemp("secure-mosquitto"), auth=auth,
                        tls=tls_files) as broker:
        yield broker


def service_url(broker: LocalMosquitto, name: str) -> str:
    return f"mqtt://{name}:{SERVICES[name]}@127.0.0.1:{broker.port}"


async def test_a_registered_device_publishes_with_its_key_until_it_is_renewed(
    secure_broker: LocalMosquitto, tls_files: TlsFiles, make_key: Callable[..., Any],
    db: asyncpg.Pool[Any], database_url: str, artifacts: Path, uid: str,
) -> None:
    ingest = IngestProcess(database_url=database_url,
                           mqtt_url=service_url(secure_broker, "fleetline-ingest"),
                           log_dir=artifacts, name=f"{uid}-secure")
    api = ApiProcess(database_url=database_url,
                     mqtt_url=service_url(secure_broker, "fleetline-api"),
                     log_dir=artifacts, name=f"{uid}-secure",
                     env={"FLEETLINE_API_DEVICE_MQTT_URL": secure_broker.tls_url})
    ingest.start()
    api.start()  # /readyz includes the broker: the service account logged in
    try:
        http = httpx.Client(base_url=api.url, timeout=10,
                            headers={"Authorization": f"Bearer {await make_key('admin')}"})
        device_id = f"{uid}-dev"
        created = http.post("/v1/devices", json={"id": device_id}).json()
        key = created["credentials"]["key"]
        # The connection string names the devices' TLS listener.
        text = created["credentials"]["connection_string"]
        parts = dict(p.split("=", 1) for p in text.split(";"))
        assert (parts["HostName"], int(parts["Port"])) == ("127.0.0.1", secure_broker.tls_port)
        assert parts["SharedAccessKey"] == key
        tls_url = f"mqtts://{parts['HostName']}:{parts['Port']}"
        ca = tls_files.ca_cert

        # The raw key and a token from the API both log in over TLS; readings are stored.
        dev = Device(tls_url, device_id, password=key, ca_file=ca)
        dev.publish_all([{"values": {"temp": 1.0}}])
        token = http.post(f"/v1/devices/{device_id}/token", json={"ttl_s": 60}).json()["token"]
        dev2 = Device(tls_url, device_id, password=token, ca_file=ca)  # takes over the session
        wait_until(lambda: not dev.connected.is_set(), what="the first session to be replaced")
        dev2.publish_all([{"values": {"temp": 2.0}}])
        assert await wait_rows(db, device_id, 2) == 2

        # Publishing into another device's topics is dropped by the broker's ACL.
        dev2.client.publish(f"devices/{uid}-other/telemetry", b'{"values": {"temp": 9}}', qos=1)
        # Anonymous and wrong-key logins are refused.
        with pytest.raises(AssertionError, match="could not connect"):
            Device(tls_url, f"{uid}-anon", ca_file=ca)
        with pytest.raises(AssertionError, match="could not connect"):
            Device(tls_url, device_id, password=key[:-4] + "AAA=", ca_file=ca)

        # Renewing the key disconnects the device; the old key and token are refused.
        new_key = http.post(f"/v1/devices/{device_id}/key").json()["key"]
        wait_until(lambda: not dev2.connected.is_set(), timeout=10,
                   what="the broker to disconnect the device with the old key")
        with pytest.raises(AssertionError, match="could not connect"):
            Device(tls_url, device_id, password=key, ca_file=ca)
        dev3 = Device(tls_url, device_id, password=new_key, ca_file=ca)
        dev3.publish_all([{"values": {"temp": 3.0}}])
        assert await wait_rows(db, device_id, 3) == 3
        time.sleep(0.5)
        assert await db.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1", f"{uid}-other") == 0
        for d in (dev, dev2, dev3):
            d.close()
    finally:
        api.stop()
        ingest.stop()


def test_garbage_on_the_devices_listener_is_dropped_and_the_broker_serves_on(
    secure_broker: LocalMosquitto, tls_files: TlsFiles,
) -> None:
    """Plain MQTT, random bytes, a truncated TLS ClientHello and a TLS session that sends
    garbage, at the TLS listener: each connection is dropped, and a TLS client logs in
    (is refused for its wrong key: the broker answered) right after."""
    import os
    import socket
    import ssl

    port = secure_broker.tls_port or 0
    connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04junk"
    hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(20)
    for payload in (connect, os.urandom(4096), hello):
        # A second for an answer: a listener that spoke MQTT would CONNACK at once; the
        # truncated ClientHello gets none (the broker waits for the rest of it).
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(payload)
            try:
                answer = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                answer = b""
            # Whatever comes back is a TLS alert at most, never an MQTT CONNACK.
            assert not answer.startswith(b"\x20"), answer[:16]
    context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(os.urandom(2048))
            try:
                tls.recv(16)
            except (ssl.SSLError, ConnectionResetError, TimeoutError):
                pass
    with pytest.raises(AssertionError, match="could not connect"):
        Device(secure_broker.tls_url, "nobody", password="x", ca_file=tls_files.ca_cert)
    assert secure_broker.running
    assert "Segmentation" not in secure_broker.log_path.read_text(errors="replace")
