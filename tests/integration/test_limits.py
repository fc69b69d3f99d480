"""Per-device limits, enforced by the broker's auth plugin and set over REST.

A device over its limit is refused explicitly (MQTT 5: the PUBACK says not authorized;
MQTT 3.1.1, which has no PUBACK codes: disconnected before the PUBACK, so the message is
still the device's to send), counted per device (REST) and logged, while another
device's publishes go through. Overrides per device and per tag apply to connected
devices within seconds.
"""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem
from tests.integration.test_broker_auth import log_has, wait_for
from tests.support import ApiProcess

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 135
TIGHT = {"messages_per_second": 1, "burst_messages": 5, "bytes_per_second": 1_000_000,
         "burst_bytes": 1_048_576}


class Publisher:
    """A device that records each PUBACK's reason code and whether it was cut off."""

    def __init__(self, broker: LocalMosquitto, device_id: str, key: str, tls: TlsFiles,
                 protocol: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=protocol)
        self.client.username_pw_set(device_id, key)
        self.client.tls_set_context(ssl.create_default_context(cafile=str(tls.ca_cert)))
        self.acks: dict[int, int] = {}
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", broker.tls_port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{device_id} did not connect"

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        # 0 (success) and 16 (no subscribers) are acceptances alike.
        self.acks[mid] = 0 if reason.value < 0x80 else reason.value

    def publish(self, topic: str, n: int) -> list[int]:
        return [self.client.publish(topic, b'{"values": {"t": 1}}', qos=1).mid for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def new_device(rest: httpx.Client, device_id: str, **tags: str) -> str:
    created = rest.post("/v1/devices", json={"id": device_id, "tags": tags})
    assert created.status_code == 201, created.text
    key: str = created.json()["credentials"]["key"]
    return key


def test_mqtt5_device_over_its_limit_gets_refusals_others_do_not(
    rest: httpx.Client, secure_api: ApiProcess, secure_broker: LocalMosquitto,
    tls_files: TlsFiles, uid: str,
) -> None:
    noisy, calm = f"{uid}-noisy", f"{uid}-calm"
    assert rest.put(f"/v1/limits/devices/{noisy}", json=TIGHT).status_code == 200
    noisy_dev = Publisher(secure_broker, noisy, new_device(rest, noisy), tls_files, mqtt.MQTTv5)
    calm_dev = Publisher(secure_broker, calm, new_device(rest, calm), tls_files, mqtt.MQTTv5)
    mids = noisy_dev.publish(f"devices/{noisy}/telemetry", 20)
    calm_mids = calm_dev.publish(f"devices/{calm}/telemetry", 20)
    wait_for(lambda: set(mids) <= noisy_dev.acks.keys() and set(calm_mids) <= calm_dev.acks.keys(),
             what="every PUBACK")
    codes = [noisy_dev.acks[m] for m in mids]
    assert codes[:5] == [0] * 5 and codes.count(NOT_AUTHORIZED) >= 14, codes
    assert [calm_dev.acks[m] for m in calm_mids] == [0] * 20  # the default's burst
    assert not noisy_dev.disconnected.is_set()
    assert log_has(secure_broker, f"device '{noisy}' is over its limits")
    refused = wait_for(lambda: rest.get(f"/v1/devices/{noisy}/limits").json()["refused"],
                       what="the refusals counted")
    assert refused["messages"] == codes.count(NOT_AUTHORIZED)
    shown = rest.get(f"/v1/devices/{noisy}/limits").json()["limits"]
    assert shown["selector"] == f"device:{noisy}" and shown["burst_messages"] == 5
    assert rest.get(f"/v1/devices/{calm}/limits").json()["refused"] is None
    # A second later the bucket holds one more message.
    time.sleep(1.1)
    (mid,) = noisy_dev.publish(f"devices/{noisy}/telemetry", 1)
    wait_for(lambda: mid in noisy_dev.acks, what="the PUBACK")
    assert noisy_dev.acks[mid] == 0
    # And in the API's metrics (refreshed every 15 s; the second above counts toward the
    # wait): at least this device's.
    assert wait_for(lambda: secure_api.metric("fleetline_devices_over_limit") >= 1,
                    timeout=20, what="the metric")
    assert secure_api.metric("fleetline_device_limit_refused_messages") >= refused["messages"]
    noisy_dev.close()
    calm_dev.close()


def test_mqtt311_device_over_its_limit_is_disconnected_before_the_puback(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_files: TlsFiles, uid: str
) -> None:
    # The override names a tag; the device gets it by its tag.
    assert rest.put(f"/v1/limits/tags/model/{uid}", json=TIGHT).status_code == 200
    key = new_device(rest, uid, model=uid)
    device = Publisher(secure_broker, uid, key, tls_files, mqtt.MQTTv311)
    device.client.reconnect_delay_set(60, 60)  # stay disconnected: what was acknowledged?
    mids = device.publish(f"devices/{uid}/telemetry", 8)
    assert device.disconnected.wait(10), "the device stayed connected over its limit"
    # Never an acknowledgement past the burst: the sixth and later stay the device's (the
    # broker may not flush the burst's PUBACKs before closing: those come again, at
    # least once).
    assert set(device.acks) <= set(mids[:5]), device.acks
    assert wait_for(lambda: rest.get(f"/v1/devices/{uid}/limits").json()["refused"],
                    what="the refusal counted")["messages"] >= 1
    device.close()


def test_limit_changes_reach_connected_devices(
    rest: httpx.Client, secure_broker: LocalMosquitto, tls_files: TlsFiles, uid: str
) -> None:
    device = Publisher(secure_broker, uid, new_device(rest, uid), tls_files, mqtt.MQTTv5)
    mids = device.publish(f"devices/{uid}/telemetry", 10)
    wait_for(lambda: set(mids) <= device.acks.keys(), what="every PUBACK")
    assert all(device.acks[m] == 0 for m in mids)
    assert rest.put(f"/v1/limits/devices/{uid}", json=TIGHT).status_code == 200
    time.sleep(0.5)  # the notification reaches the broker
    mids = device.publish(f"devices/{uid}/telemetry", 10)
    wait_for(lambda: set(mids) <= device.acks.keys(), what="every PUBACK")
    assert NOT_AUTHORIZED in [device.acks[m] for m in mids]
    assert rest.delete(f"/v1/limits/devices/{uid}").status_code == 204
    device.close()


def test_limits_over_rest(rest: httpx.Client, uid: str) -> None:
    listed = rest.get("/v1/limits").json()["items"]
    assert listed[0]["selector"] == "default"
    assert listed[0]["burst_messages"] >= 1
    for body in [{**TIGHT, "burst_bytes": 1000}, {**TIGHT, "messages_per_second": 0},
                 {k: v for k, v in TIGHT.items() if k != "burst_messages"}]:
        assert_problem(rest.put(f"/v1/limits/devices/{uid}", json=body), 422)
    assert_problem(rest.delete(f"/v1/limits/devices/{uid}-none"), 404)
    assert_problem(rest.get(f"/v1/devices/{uid}-none/limits"), 404)
