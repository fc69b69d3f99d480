"""umqtt.simple's client API on paho-mqtt: how fleetline_device runs under CPython.

The Raspberry Pi agent (and the tests) run the same device core as the ESP32 firmware;
this class gives it the client it expects there. Like umqtt.simple it is synchronous and
single-threaded: paho's network loop runs only inside these calls (``client.loop()``, no
background thread, no automatic reconnection: the core reconnects), ``publish`` with QoS
1 returns once the broker acknowledged it, ``subscribe`` once the SUBACK came, and
``check_msg`` hands at most one received message to the callback, in the caller's
thread. Failures raise OSError, and a refused CONNECT raises :class:`MQTTException` with
the MQTT 3.1.1 return code, as umqtt.simple does.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

# How long connect, publish (QoS 1) and subscribe wait for the broker's answer.
ANSWER_TIMEOUT_S = 10.0
# Messages received but not yet handed to the callback; beyond, they are dropped (paho
# has acknowledged them: a device's QoS 1 stops at its own memory, as on a board).
MAX_QUEUED_MESSAGES = 100
# paho reports a refused MQTT 3.1.1 CONNACK as the MQTT 5 reason code; umqtt.simple
# raises the 3.1.1 return code.
_CONNACK_3_1_1 = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}

Callback = Callable[[bytes, bytes], object]


class MQTTException(Exception):  # umqtt.simple's name: the core knows refusals by it
    pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else value


class MQTTClient:
    """``MQTTClient(client_id, server, port, user, password, keepalive)``, as umqtt.simple;
    ``ssl_context`` turns on TLS."""

    def __init__(
        self,
        client_id: str | bytes,
        server: str,
        port: int = 0,
        user: str | bytes | None = None,
        password: str | bytes | None = None,
        keepalive: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = _text(client_id)
        self.server = server
        self.port = port or (8883 if ssl_context else 1883)
        self.user = None if user is None else _text(user)
        self.password = None if password is None else _text(password)
        self.keepalive = keepalive
        self.ssl_context = ssl_context
        self.cb: Callback | None = None
        self.dropped = 0
        self._will: tuple[str, bytes, int, bool] | None = None
        self._paho: mqtt.Client | None = None
        self._connack: int | None = None
        self._subacks: dict[int, list[int]] = {}
        self._lost: str | None = None
        self._inbox: deque[tuple[bytes, bytes]] = deque()

    def set_callback(self, f: Callback) -> None:
        self.cb = f

    def set_last_will(
        self, topic: str | bytes, msg: str | bytes, retain: bool = False, qos: int = 0
    ) -> None:
        payload = msg.encode() if isinstance(msg, str) else bytes(msg)
        self._will = (_text(topic), payload, qos, retain)

    def connect(self, clean_session: bool = True) -> int:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        if self.user is not None:
            client.username_pw_set(self.user, self.password)
        if self._will is not None:
            topic, payload, qos, retain = self._will
            client.will_set(topic, payload, qos, retain)
        if self.ssl_context is not None:
            client.tls_set_context(self.ssl_context)
        self._paho = client
        self._connack = None
        self._lost = None
        client.connect(self.server, self.port, self.keepalive)  # OSError when unreachable
        try:
            self._until(lambda: self._connack is not None, "CONNACK")
        except OSError:
            if not self._connack:  # paho's loop ends in an error after a refusal
                raise
        if self._connack:
            self.close()
            raise MQTTException(self._connack)
        return 0

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        code = int(reason.value)
        self._connack = _CONNACK_3_1_1.get(code, code) if reason.is_failure else 0

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._lost = str(reason)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        self._subacks[mid] = [int(code.value) for code in codes]

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if len(self._inbox) >= MAX_QUEUED_MESSAGES:
            self.dropped += 1
            return
        self._inbox.append((message.topic.encode(), bytes(message.payload)))

    def _client(self) -> mqtt.Client:
        if self._paho is None:
            raise OSError("not connected")
        return self._paho

    def _loop(self, timeout: float) -> None:
        client = self._client()
        if self._lost is None:
            rc = client.loop(timeout)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._lost = mqtt.error_string(rc)
        if self._lost is not None:
            raise OSError("connection lost: " + self._lost)

    def _until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                raise OSError("no " + what + " within " + str(ANSWER_TIMEOUT_S) + " s")
            self._loop(0.05)

    def subscribe(self, topic: str | bytes, qos: int = 0) -> None:
        rc, mid = self._client().subscribe(_text(topic), qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise OSError("subscribe failed: " + mqtt.error_string(rc))
        self._until(lambda: mid in self._subacks, "SUBACK")
        if any(code >= 0x80 for code in self._subacks.pop(mid)):
            raise MQTTException(0x80)

    def publish(
        self, topic: str | bytes, msg: str | bytes, retain: bool = False, qos: int = 0
    ) -> None:
        info = self._client().publish(_text(topic), msg, qos, retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise OSError("publish failed: " + mqtt.error_string(info.rc))
        if qos:
            self._until(info.is_published, "PUBACK")
        else:
            self._loop(0)

    def check_msg(self) -> int | None:
        """Hand one received message to the callback (0x30, the PUBLISH packet type, as
        umqtt.simple answers), or None when there is none."""
        if not self._inbox:
            self._loop(0)
        if not self._inbox:
            return None
        topic, payload = self._inbox.popleft()
        if self.cb is not None:
            self.cb(topic, payload)
        return 0x30

    def wait_msg(self) -> int | None:
        while not self._inbox:
            self._loop(0.1)
        return self.check_msg()

    def ping(self) -> None:
        self._loop(0)  # paho sends PINGREQ itself when the keepalive is due

    def disconnect(self) -> None:
        client = self._client()
        client.disconnect()
        self.close()

    def close(self) -> None:
        """Close the socket without DISCONNECT: the broker publishes the Last Will."""
        client, self._paho = self._paho, None
        if client is not None:
            sock = client.socket()
            if sock is not None:
                sock.close()
