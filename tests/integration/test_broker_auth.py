"""The broker's auth plugin (deploy/mosquitto/auth) against a real Mosquitto and database.

Devices log in with the arithmetic of fleetline.devicekeys (the reference the C code
follows): the key, or a live SAS token, for the key_version in the registry; client id
= username = device id. Each device reads and writes only under devices/{its id}/;
service accounts have full access. A key change (migration 0009's notification)
disconnects the device. Refusals are checked twice: the CONNACK code, and the reason the
plugin logged.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from fleetline import devicekeys
from fleetline_dev.embedded import (
    BrokerAuth,
    EmbeddedError,
    LocalMosquitto,
    auth_plugin_path,
)
from tests.support import TcpProxy

pytestmark = pytest.mark.integration

SECRET = secrets.token_hex(32).encode()
SERVICES = {"ingest": secrets.token_urlsafe(16), "bench": secrets.token_urlsafe(16)}
NOT_AUTHORIZED = 135  # MQTT 5 CONNACK "Not authorized"; paho maps 3.1.1's code 5 to it
ADMINISTRATIVE_ACTION = 152  # MQTT 5 DISCONNECT reason of a kick
V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5


class Client:
    """A paho client that connects once (no automatic reconnection) and records what it
    gets: the CONNACK, SUBACK codes, messages and disconnections. With ``tls`` it connects
    to the broker's TLS listener."""

    def __init__(self, broker: LocalMosquitto, client_id: str, username: str | None = None,
                 password: str | None = None, *, protocol: int = V311,
                 tls: ssl.SSLContext | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol)
        if tls is not None:
            self.client.tls_set_context(tls)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: ReasonCode | None = None
        self.answered = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, msg: self.messages.append(
            (msg.topic, msg.payload))
        self.client.on_subscribe = self._on_subscribe
        try:
            self.client.connect("127.0.0.1", broker.port if tls is None else broker.tls_port)
        except OSError as exc:  # a handshake the broker refused (a bad certificate)
            self.handshake_error: OSError | None = exc
            return
        self.handshake_error = None
        self.client.loop_start()
        if not self.answered.wait(10):
            self.close()
            raise AssertionError(f"no CONNACK for {client_id}")
        if not self.ok:
            self.close()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self.answered.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()
        self.answered.set()
        # One connection per Client: paho would otherwise reconnect by itself.
        self.client.disconnect()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode],
                      _p: Any) -> None:
        self.subacks[mid] = codes

    @property
    def ok(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    @property
    def refused(self) -> bool:
        return self.connack is not None and self.connack.value == NOT_AUTHORIZED

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        wait_for(lambda: mid in self.subacks, what=f"SUBACK for {filters}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def received(self, payload: bytes) -> bool:
        return any(p == payload for _, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(check: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


def log_has(broker: LocalMosquitto, text: str, *, timeout: float = 5.0) -> bool:
    """Whether the broker logged ``text`` (waiting for its log to be flushed)."""
    deadline = time.monotonic() + timeout
    while True:
        if text in broker.log_path.read_text(errors="replace"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def assert_refused(client: Client, broker: LocalMosquitto, username: str, reason: str) -> None:
    assert client.refused, f"expected Not authorized, got {client.connack}"
    log = broker.log_path.read_text(errors="replace")
    wanted = [line for line in log.splitlines()
              if f"refused login of username '{username}'" in line]
    assert wanted and reason in wanted[-1], f"expected a refusal for {reason!r}; log: {wanted}"


def key_for(device_id: str, version: int = 1) -> str:
    return devicekeys.derive_key(SECRET, device_id, version)


def token_for(device_id: str, version: int = 1, *, ttl: int = 600,
              now: float | None = None) -> str:
    return devicekeys.sas_token(key_for(device_id, version), device_id, ttl_seconds=ttl,
                                now=now)[0]


async def add_device(db: asyncpg.Pool[Any], device_id: str, version: int = 1) -> None:
    # Registered with its key at once: an UPDATE of key_version would notify the broker,
    # which is what the key-change tests do on purpose.
    await db.execute("INSERT INTO devices (id, key_version) VALUES ($1, $2)", device_id, version)


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking MQTT work off the event loop (the asyncpg pool shares the loop)."""
    return asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def auth_broker(database_url: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LocalMosquitto]:
    auth = BrokerAuth(database_url=database_url, key_secret=SECRET, services=SERVICES)
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto-auth"), auth=auth) as server:
        yield server


def service(broker: LocalMosquitto, client_id: str, name: str = "ingest") -> Client:
    client = Client(broker, client_id, name, SERVICES[name])
    assert client.ok, client.connack
    return client


# --- logins ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_raw_key_is_accepted(db: asyncpg.Pool[Any], auth_broker: LocalMosquitto,
                                   uid: str, protocol: int) -> None:
    await add_device(db, uid)
    client = await run(Client, auth_broker, uid, uid, key_for(uid), protocol=protocol)
    assert client.ok, client.connack
    client.close()


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_valid_token_is_accepted(db: asyncpg.Pool[Any], auth_broker: LocalMosquitto,
                                       uid: str, protocol: int) -> None:
    await add_device(db, uid, version=3)
    client = await run(Client, auth_broker, uid, uid, token_for(uid, 3), protocol=protocol)
    assert client.ok, client.connack
    client.close()


async def test_expired_token_is_refused(db: asyncpg.Pool[Any], auth_broker: LocalMosquitto,
                                        uid: str) -> None:
    await add_device(db, uid)
    expired = token_for(uid, ttl=60, now=time.time() - 61)
    assert not devicekeys.verify_password(key_for(uid), uid, expired)
    client = await run(Client, auth_broker, uid, uid, expired)
    assert_refused(client, auth_broker, uid, "expired token")


def moved_expiry(token: str) -> str:
    sig, _, expiry = token.partition("&se=")
    return f"{sig}&se={int(expiry) + 1}"


async def test_wrong_key_or_signature_is_refused(db: asyncpg.Pool[Any],
                                                 auth_broker: LocalMosquitto, uid: str) -> None:
    # One device per case: five failures of one client id from one address throttle it.
    cases = [
        (lambda d: key_for(d, 1), "bad key"),  # the previous key
        (lambda d: devicekeys.derive_key(b"x" * 32, d, 2), "bad key"),  # another deployment's
        (lambda d: key_for(d, 2)[:-2], "bad key"),
        (lambda d: "", "bad key"),
        (lambda d: token_for(d, 1), "bad token signature"),  # signed with the previous key
        (lambda d: moved_expiry(token_for(d, 2)), "bad token signature"),  # expiry moved
        (lambda d: token_for(d, 2).split("&se=")[0], "bad token"),
    ]
    for n, (password, reason) in enumerate(cases):
        device_id = f"{uid}-{n}"
        await add_device(db, device_id, version=2)
        client = await run(Client, auth_broker, device_id, device_id, password(device_id))
        assert_refused(client, auth_broker, device_id, reason)
    await add_device(db, uid, version=2)
    # Leading zeros in se= sign the same number, as int() reads it in devicekeys.
    padded = token_for(uid, 2).replace("&se=", "&se=00")
    assert devicekeys.verify_password(key_for(uid, 2), uid, padded)
    client = await run(Client, auth_broker, uid, uid, padded)
    assert client.ok, client.connack
    client.close()


async def test_device_without_key_is_refused(db: asyncpg.Pool[Any],
                                             auth_broker: LocalMosquitto, uid: str) -> None:
    await db.execute("INSERT INTO devices (id) VALUES ($1)", uid)  # key_version 0
    client = await run(Client, auth_broker, uid, uid, key_for(uid, 0))
    assert_refused(client, auth_broker, uid, "no key issued")


async def test_unknown_device_is_refused(auth_broker: LocalMosquitto, uid: str) -> None:
    client = await run(Client, auth_broker, uid, uid, key_for(uid))
    assert_refused(client, auth_broker, uid, "unknown device")


async def test_client_id_must_be_the_device_id(db: asyncpg.Pool[Any],
                                               auth_broker: LocalMosquitto, uid: str) -> None:
    await add_device(db, uid)
    client = await run(Client, auth_broker, f"{uid}-other", uid, key_for(uid))
    assert_refused(client, auth_broker, uid, "client id mismatch")
    # MQTT 3.1.1 lets the broker pick an id for an empty one: still not the device id.
    client = await run(Client, auth_broker, "", uid, key_for(uid))
    assert_refused(client, auth_broker, uid, "client id mismatch")


async def test_anonymous_login_is_refused(auth_broker: LocalMosquitto, uid: str) -> None:
    client = await run(Client, auth_broker, uid)
    assert_refused(client, auth_broker, "(none)", "anonymous login")


async def test_service_accounts(auth_broker: LocalMosquitto, uid: str) -> None:
    client = await run(Client, auth_broker, f"any-client-id-{uid}", "ingest", SERVICES["ingest"])
    assert client.ok, client.connack
    client.close()
    client = await run(Client, auth_broker, uid, "ingest", SERVICES["bench"])
    assert_refused(client, auth_broker, "ingest", "bad service password")


async def test_services_file_is_reloaded_on_sighup(auth_broker: LocalMosquitto,
                                                   uid: str) -> None:
    password = secrets.token_urlsafe(12)
    client = await run(Client, auth_broker, uid, f"svc-{uid}", password)
    assert client.refused
    reloaded = BrokerAuth(database_url="unused", key_secret=SECRET,
                          services={**SERVICES, f"svc-{uid}": password})
    auth_broker.services_path.write_text(reloaded.services_text())
    assert auth_broker.pid is not None
    os.kill(auth_broker.pid, signal.SIGHUP)
    assert log_has(auth_broker, f"reloaded {len(SERVICES) + 1} service account(s)")
    client = await run(Client, auth_broker, uid, f"svc-{uid}", password)
    assert client.ok, client.connack
    client.close()


# --- a key change ---------------------------------------------------------------------


async def test_new_key_disconnects_the_device_and_refuses_the_old_key(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    v5_id, v311_id = f"{uid}-5", f"{uid}-3"
    for device_id in (v5_id, v311_id):
        await add_device(db, device_id)
    v5 = await run(Client, auth_broker, v5_id, v5_id, token_for(v5_id), protocol=V5)
    v311 = await run(Client, auth_broker, v311_id, v311_id, key_for(v311_id))
    assert v5.ok and v311.ok
    await db.execute("UPDATE devices SET key_version = key_version + 1 WHERE id = ANY($1)",
                     [v5_id, v311_id])
    # The notification reaches the plugin, which disconnects both at once: well within
    # the 5 s the key version stays cached.
    await run(wait_for, lambda: v5.disconnected.is_set() and v311.disconnected.is_set(),
              timeout=3, what="the devices to be disconnected")
    assert v5.disconnect_reason is not None
    assert v5.disconnect_reason.value == ADMINISTRATIVE_ACTION, v5.disconnect_reason
    assert log_has(auth_broker, f"disconnected device '{v311_id}': its credentials changed")
    v5.close()
    v311.close()
    old = await run(Client, auth_broker, v5_id, v5_id, token_for(v5_id, 1), protocol=V5)
    assert_refused(old, auth_broker, v5_id, "bad token signature")
    new = await run(Client, auth_broker, v5_id, v5_id, token_for(v5_id, 2), protocol=V5)
    assert new.ok, new.connack
    # The new session is not disconnected by a late kick.
    await asyncio.sleep(0.5)
    assert not new.disconnected.is_set()
    new.close()


async def test_device_that_reconnects_with_its_new_key_keeps_its_session(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    await add_device(db, uid)
    old = await run(Client, auth_broker, uid, uid, key_for(uid), protocol=V5)
    assert old.ok
    await db.execute("UPDATE devices SET key_version = 2 WHERE id = $1", uid)
    # At once, racing the notification: whether the plugin reads it before or after this
    # login, the new session is the one to keep.
    new = await run(Client, auth_broker, uid, uid, token_for(uid, 2), protocol=V5)
    assert new.ok, new.connack
    await run(wait_for, old.disconnected.is_set, what="the old session to end")
    await asyncio.sleep(1)
    assert not new.disconnected.is_set(), new.disconnect_reason
    for client in (old, new):
        client.close()


async def test_notification_for_a_device_with_a_current_session_keeps_it(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    """A notification can arrive after the device already logged in again with its new
    key (the plugin reads it at its next tick): the plugin checks the registry first."""
    await add_device(db, uid, version=4)
    device = await run(Client, auth_broker, uid, uid, key_for(uid, 4), protocol=V5)
    assert device.ok
    await db.execute("SELECT pg_notify('fleetline_device_credentials', $1)", uid)
    await asyncio.sleep(1)
    assert not device.disconnected.is_set(), device.disconnect_reason
    device.close()
    # The notification also dropped the cached version: a change is seen at once.
    await db.execute("UPDATE devices SET key_version = 5 WHERE id = $1", uid)
    stale = await run(Client, auth_broker, uid, uid, key_for(uid, 4))
    assert_refused(stale, auth_broker, uid, "bad key")


async def test_key_change_of_an_offline_persistent_session(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    await add_device(db, uid)
    # The broker keeps the session of a 3.1.1 client without clean session; the kick
    # below finds it offline.
    persistent = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uid,
                             protocol=V311, clean_session=False)
    persistent.username_pw_set(uid, key_for(uid))
    assert persistent.connect("127.0.0.1", auth_broker.port) == 0
    persistent.loop_start()
    await run(wait_for, persistent.is_connected, what="the persistent session")
    persistent.disconnect()
    persistent.loop_stop()
    await db.execute("UPDATE devices SET key_version = 2 WHERE id = $1", uid)
    await asyncio.sleep(0.5)
    # Mosquitto 2.0.11 corrupts its session and keepalive lists when a plugin kicks an
    # offline session, and then drops healthy clients: the plugin must not kick it.
    assert not log_has(auth_broker, f"disconnected device '{uid}'", timeout=0)
    again = await run(Client, auth_broker, uid, uid, key_for(uid, 2))
    await add_device(db, f"{uid}-x")
    other = await run(Client, auth_broker, f"{uid}-x", f"{uid}-x", key_for(f"{uid}-x"))
    assert again.ok and other.ok
    await asyncio.sleep(2.5)
    assert not again.disconnected.is_set() and not other.disconnected.is_set()
    again.close()
    other.close()


async def test_deleted_device_is_disconnected(db: asyncpg.Pool[Any],
                                              auth_broker: LocalMosquitto, uid: str) -> None:
    await add_device(db, uid)
    client = await run(Client, auth_broker, uid, uid, key_for(uid), protocol=V5)
    assert client.ok
    await db.execute("DELETE FROM devices WHERE id = $1", uid)
    await run(wait_for, client.disconnected.is_set, timeout=3, what="the kick")
    client.close()
    again = await run(Client, auth_broker, uid, uid, key_for(uid))
    assert_refused(again, auth_broker, uid, "unknown device")


# --- topics ---------------------------------------------------------------------------


async def test_device_publishes_only_under_its_own_topics(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    me, other, lookalike = f"{uid}-a", f"{uid}-b", f"{uid}-a0"
    for device_id in (me, other, lookalike):
        await add_device(db, device_id)
    watcher = await run(service, auth_broker, f"watch-{uid}")
    await run(watcher.subscribe, "devices/#", "elsewhere/#", "#")
    device = await run(Client, auth_broker, me, me, key_for(me))
    assert device.ok
    # fleetline/stream/...: the live stream's events and listeners, for services only.
    forbidden = [f"devices/{other}/telemetry", f"devices/{lookalike}/telemetry",
                 f"devices/{me}", "elsewhere/x", f"$share/g/devices/{me}/x",
                 "fleetline/stream/events", f"fleetline/stream/listeners/{me}"]
    for n, topic in enumerate(forbidden):
        if topic.startswith("$share"):
            continue  # not a topic one can publish to; the subscription test covers it
        await run(device.publish, topic, f"forbidden-{n}".encode())
    # Messages from one publisher arrive in order: once this one is in, any forbidden one
    # that got through would be in too.
    await run(device.publish, f"devices/{me}/telemetry", b"allowed")
    await run(wait_for, lambda: watcher.received(b"allowed"), what="the allowed message")
    leaked = [t for t, p in watcher.messages if p.startswith(b"forbidden")]
    assert leaked == [], f"the broker accepted {leaked} from device {me}"
    device.close()
    watcher.close()


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_device_subscribes_only_to_its_own_topics(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str, protocol: int
) -> None:
    me, other = f"{uid}-a", f"{uid}-b"
    for device_id in (me, other):
        await add_device(db, device_id)
    device = await run(Client, auth_broker, me, me, key_for(me), protocol=protocol)
    neighbour = await run(Client, auth_broker, other, other, key_for(other))
    backend = await run(service, auth_broker, f"backend-{uid}")
    assert device.ok and neighbour.ok
    denied = ["devices/#", "devices/+/telemetry", f"devices/{other}/#",
              f"$share/g/devices/{me}/#", "#", "fleetline/stream/events",
              "fleetline/stream/heard/+"]
    codes = await run(device.subscribe, *denied, f"devices/{me}/#")
    # Mosquitto 2.0.11 answers a denied filter with a failure code (0x80 in 3.1.1,
    # 0x87 "Not authorized" in 5) and does not subscribe it.
    assert [c.is_failure for c in codes] == [True] * len(denied) + [False], codes
    await run(neighbour.publish, f"devices/{other}/telemetry", b"neighbour's")
    await run(backend.publish, f"devices/{other}/commands", b"for the neighbour")
    # The neighbour's PUBACK came after the broker routed its message: this one is later.
    await run(backend.publish, f"devices/{me}/commands", b"mine")
    await run(wait_for, lambda: device.received(b"mine"), what="the device's own command")
    assert [p for _, p in device.messages] == [b"mine"]
    for client in (device, neighbour, backend):
        client.close()


async def test_device_may_not_write_the_services_topics_or_retain_readings(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    """The desired twin, method requests and cloud-to-device messages are the services'
    to write, and only a device's status is retained: a device that tries (a bug, or a
    stolen key planting a retained command for itself) is denied, and the broker logs
    it."""
    await add_device(db, uid)
    watcher = await run(service, auth_broker, f"watch-{uid}")
    await run(watcher.subscribe, f"devices/{uid}/#")
    device = await run(Client, auth_broker, uid, uid, key_for(uid))
    denied = [(f"devices/{uid}/twin/desired", True), (f"devices/{uid}/twin/desired", False),
              (f"devices/{uid}/methods/r1/req", True), (f"devices/{uid}/methods/r2/req", False),
              (f"devices/{uid}/c2d", False), (f"devices/{uid}/modules/m/twin/desired", False),
              (f"devices/{uid}/modules/m/methods/r3/req", False),
              (f"devices/{uid}/transfers/res", False),
              (f"devices/{uid}/telemetry", True), (f"devices/{uid}/twin/reported", True)]
    for n, (topic, retain) in enumerate(denied):
        await run(device.publish, topic, f"denied-{n}".encode(), retain=retain)
    allowed = [(f"devices/{uid}/status", True), (f"devices/{uid}/methods/r4/res", False),
               (f"devices/{uid}/c2d/ack", False), (f"devices/{uid}/twin/reported", False),
               (f"devices/{uid}/modules/m/twin/reported", False),
               (f"devices/{uid}/telemetry", False)]
    for n, (topic, retain) in enumerate(allowed):
        await run(device.publish, topic, f"allowed-{n}".encode(), retain=retain)
    await run(wait_for, lambda: watcher.received(f"allowed-{len(allowed) - 1}".encode()),
              what="the last allowed message")
    got = [p.decode() for _, p in watcher.messages]
    assert got == [f"allowed-{n}" for n in range(len(allowed))], got
    # Logged (10 lines a second at most; the rest are counted in the minute's summary).
    assert log_has(auth_broker, f"denied publish of device '{uid}' to "
                                f"'devices/{uid}/twin/desired': a topic only the services write")
    # The services still write them (retained desired twins are how devices get them).
    await run(watcher.publish, f"devices/{uid}/twin/desired", b"{}", retain=True)
    await run(device.publish, f"devices/{uid}/status", b"", retain=True)  # clear it
    await run(watcher.publish, f"devices/{uid}/twin/desired", b"", retain=True)
    for client in (device, watcher):
        client.close()


async def test_a_token_valid_too_long_is_refused(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    """A SAS token may be valid 366 days at most (the longest the API signs): a token for
    year 9999 from a leaked key would otherwise never end."""
    await add_device(db, uid)
    key = key_for(uid)
    expiry = int(time.time()) + devicekeys.MAX_TOKEN_TTL_SECONDS + 3600
    far = f"sig={devicekeys.sign(key, uid, expiry)}&se={expiry}"
    client = await run(Client, auth_broker, uid, uid, far)
    assert_refused(client, auth_broker, uid, "token valid longer than the maximum")
    year_9999 = f"sig={devicekeys.sign(key, uid, 253402300799)}&se=253402300799"
    client = await run(Client, auth_broker, uid, uid, year_9999)
    assert_refused(client, auth_broker, uid, "token valid longer than the maximum")
    near = devicekeys.sas_token(key, uid, ttl_seconds=365 * 86400)[0]
    client = await run(Client, auth_broker, uid, uid, near)
    assert client.ok, client.connack
    client.close()


async def test_failed_logins_are_throttled_with_backoff(
    db: asyncpg.Pool[Any], auth_broker: LocalMosquitto, uid: str
) -> None:
    """Five wrong passwords for one client id from one address, then even the right key
    is refused unchecked until the backoff (1 s, doubling) has passed; another device
    from the same address is not held up, nor a service account whose client id a
    stranger failed with; a login once it has passed clears the count."""
    await add_device(db, uid)
    await add_device(db, f"{uid}-other")
    for n in range(5):
        client = await run(Client, auth_broker, uid, uid, f"wrong-{n}")
        assert_refused(client, auth_broker, uid, "bad key")
    client = await run(Client, auth_broker, uid, uid, "wrong-5")
    assert client.refused
    assert log_has(auth_broker, f"6 failed logins of pair:127.0.0.1/{uid}: its next attempt "
                                "waits 1000 ms")
    started = time.monotonic()
    throttled = await run(Client, auth_broker, uid, uid, key_for(uid))
    assert throttled.refused  # the right key, within the backoff: not even checked
    other = await run(Client, auth_broker, f"{uid}-other", f"{uid}-other", key_for(f"{uid}-other"))
    assert other.ok, other.connack
    other.close()
    # A stranger fails ten times with a service's client id: the service still logs in.
    for n in range(10):
        stranger = await run(Client, auth_broker, f"svc-{uid}", f"svc-{uid}", f"wrong-{n}")
        assert stranger.refused
    svc = await run(service, auth_broker, f"svc-{uid}")
    assert svc.ok, svc.connack
    svc.close()
    await asyncio.sleep(max(0.0, 1.1 - (time.monotonic() - started)))
    client = await run(Client, auth_broker, uid, uid, key_for(uid))
    assert client.ok, client.connack
    client.close()
    # The count was cleared by that login: one failure now is not throttled.
    client = await run(Client, auth_broker, uid, uid, "wrong-again")
    assert_refused(client, auth_broker, uid, "bad key")
    client = await run(Client, auth_broker, uid, uid, key_for(uid))
    assert client.ok, client.connack
    client.close()


async def test_service_account_has_full_access(db: asyncpg.Pool[Any],
                                               auth_broker: LocalMosquitto, uid: str) -> None:
    await add_device(db, uid)
    listener = await run(service, auth_broker, f"listen-{uid}", "bench")
    codes = await run(listener.subscribe, "#", f"$share/{uid}/anything/#", "devices/+/telemetry")
    assert not any(c.is_failure for c in codes), codes
    talker = await run(service, auth_broker, f"talk-{uid}")
    device = await run(Client, auth_broker, uid, uid, key_for(uid))
    await run(talker.publish, f"anything/{uid}", b"one")
    await run(talker.publish, f"devices/{uid}/commands", b"two")
    await run(device.publish, f"devices/{uid}/telemetry", b"three")
    await run(wait_for, lambda: all(listener.received(p) for p in (b"one", b"two", b"three")),
              what="every message at the service")
    for client in (listener, talker, device):
        client.close()


# --- the database goes away -----------------------------------------------------------


@pytest.fixture
async def proxied_broker(database_url: str, tmp_path: Path
                         ) -> AsyncIterator[tuple[LocalMosquitto, TcpProxy]]:
    parts = urlsplit(database_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.up()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    auth = BrokerAuth(database_url=urlunsplit(parts._replace(netloc=netloc)),
                      key_secret=SECRET, services=SERVICES, cache_seconds=1)
    broker = LocalMosquitto(tmp_path / "broker", auth=auth)
    broker.start()
    try:
        yield broker, proxy
    finally:
        broker.stop()
        proxy.down()


async def test_cached_devices_log_in_while_the_database_is_down(
    db: asyncpg.Pool[Any], proxied_broker: tuple[LocalMosquitto, TcpProxy], uid: str
) -> None:
    broker, proxy = proxied_broker
    known, unseen = f"{uid}-known", f"{uid}-unseen"
    for device_id in (known, unseen):
        await add_device(db, device_id)
    first = await run(Client, broker, known, known, key_for(known))
    assert first.ok
    first.close()
    await asyncio.sleep(1.2)  # past the 1 s cache: what follows is the stale-if-error path
    proxy.down()
    again = await run(Client, broker, known, known, token_for(known))
    assert again.ok, again.connack
    assert log_has(broker, f"using the credentials of '{known}' cached")
    again.close()
    stranger = await run(Client, broker, unseen, unseen, key_for(unseen))
    assert_refused(stranger, broker, unseen, "database unavailable")
    proxy.up()
    # The plugin reconnects within its backoff (at most 10 s).
    stranger = await run(
        wait_for,
        lambda: (c := Client(broker, unseen, unseen, key_for(unseen))).ok and c,
        timeout=20, interval=0.25, what="a login once the database is back",
    )
    stranger.close()


async def test_a_gateways_known_children_work_while_the_database_is_down(
    db: asyncpg.Pool[Any], proxied_broker: tuple[LocalMosquitto, TcpProxy], uid: str
) -> None:
    """A child whose parent the plugin read keeps working through its gateway while the
    registry is away; a publish for a child it cannot ask about is not acknowledged (the
    gateway is disconnected and keeps it), never acknowledged and dropped."""
    broker, proxy = proxied_broker
    gateway, child, unknown = f"{uid}-gw", f"{uid}-c1", f"{uid}-c2"
    await db.execute("INSERT INTO devices (id, key_version, gateway) "
                     "VALUES ($1, 1, '{\"create_children\": true}')", gateway)
    await db.execute("INSERT INTO devices (id, parent_id) VALUES ($1, $2)", child, gateway)
    listener = await run(service, broker, f"listen-{uid}")
    listener.subscribe(f"devices/{child}/telemetry", f"devices/{unknown}/telemetry")
    gw = await run(Client, broker, gateway, gateway, key_for(gateway))
    assert gw.ok
    await run(gw.publish, f"devices/{child}/telemetry", b"before")
    proxy.down()
    await run(gw.publish, f"devices/{child}/telemetry", b"during")
    await run(wait_for, lambda: listener.received(b"during"), what="the known child's reading")
    info = gw.client.publish(f"devices/{unknown}/telemetry", b"unasked", qos=1)
    await run(wait_for, gw.disconnected.is_set, what="the gateway disconnected")
    assert not info.is_published() and not listener.received(b"unasked")
    proxy.up()
    for client in (gw, listener):
        client.close()


async def test_key_change_while_the_database_was_down_disconnects_after_reconnection(
    db: asyncpg.Pool[Any], proxied_broker: tuple[LocalMosquitto, TcpProxy], uid: str
) -> None:
    broker, proxy = proxied_broker
    await add_device(db, uid)
    device = await run(Client, broker, uid, uid, key_for(uid), protocol=V5)
    assert device.ok
    proxy.down()
    # The plugin's notification is lost with its connection.
    await db.execute("UPDATE devices SET key_version = 2 WHERE id = $1", uid)
    await asyncio.sleep(0.5)
    assert not device.disconnected.is_set()
    proxy.up()
    await run(wait_for, device.disconnected.is_set, timeout=20,
              what="the kick after the plugin checked its cached devices")
    device.close()


# --- configuration errors -------------------------------------------------------------


def test_plugin_refuses_to_start_without_its_options(tmp_path: Path) -> None:
    short, secret = tmp_path / "short-secret", tmp_path / "secret"
    services, bad_services = tmp_path / "services", tmp_path / "bad-services"
    short.write_bytes(b"s" * 31)
    secret.write_bytes(b"s" * 32)
    services.write_text("# nobody\n")
    bad_services.write_text("ingest:not-a-hash\n")
    database = "plugin_opt_database postgresql://127.0.0.1:1/none"
    cases = {
        "plugin_opt_database is required": [
            f"plugin_opt_key_secret_file {secret}", f"plugin_opt_services_file {services}"],
        "plugin_opt_key_secret_file is required": [
            database, f"plugin_opt_services_file {services}"],
        "plugin_opt_services_file is required": [
            database, f"plugin_opt_key_secret_file {secret}"],
        "holds 31 bytes; the secret needs at least 32": [
            database, f"plugin_opt_key_secret_file {short}",
            f"plugin_opt_services_file {services}"],
        "expected username:<hex sha256 of the password>": [
            database, f"plugin_opt_key_secret_file {secret}",
            f"plugin_opt_services_file {bad_services}"],
    }
    for n, (message, options) in enumerate(cases.items()):
        config = "\n".join([f"plugin {auth_plugin_path()}", *options])
        broker = LocalMosquitto(tmp_path / f"broker-{n}", extra_config=config)
        with pytest.raises(EmbeddedError, match="exited with code"):
            broker.start()
        assert message in broker.log_path.read_text(), message
    # The same files with every option: the broker starts.
    config = "\n".join([f"plugin {auth_plugin_path()}", database,
                        f"plugin_opt_key_secret_file {secret}",
                        f"plugin_opt_services_file {services}"])
    with LocalMosquitto(tmp_path / "broker-ok", extra_config=config) as broker:
        assert broker.running
