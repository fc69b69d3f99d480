"""A simulated device fleet speaking the device contract of docs/protocol.md (demo load).

Each device is its own MQTT connection (client id = device id, QoS 1): a retained
``offline`` Last Will and a retained ``online`` birth message on ``devices/{id}/status``,
then one reading per interval on ``devices/{id}/telemetry``. Now and then a device holds
a few readings back and sends them as one JSON array, the way devices send a backlog;
readings whose publish failed are sent that way after the reconnect. With an
OfflinePolicy devices also leave for a while (a clean goodbye) and send what they read
meanwhile when back.

From the cloud: each device subscribes to its ``c2d``, ``twin/desired`` and
``methods/+/req`` topics before it announces itself ``online`` (the API sends queued
messages when it sees that status), then reports ``{"fw", "model", "units"}`` on
``twin/reported`` (``units``: the unit of each metric it reads that has one, which the
dashboard shows on its charts; docs/protocol.md, section 5).

- Cloud-to-device messages are acknowledged with ``{"id": ..., "outcome": "complete"}``
  on ``devices/{id}/c2d/ack``. Delivery is at least once: a message whose id the device
  has handled already is acknowledged again but not acted on twice.
- The desired document is reported back with ``desired_version``; ``interval_s`` (seconds
  between readings) is applied.
- Methods ``ping`` and ``reboot`` answer 200; any other 404.
- Firmware rollouts: the device side of an update (simulated_updates.py), when the fleet
  is given an UpdatePolicy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import orjson
from pydantic import SecretStr

from fleetline import devicekeys, mqtt
from fleetline.db import close_connection
from fleetline.mqtt import backoff_seconds, make_client, wait_disconnected
from fleetline.protocol import (
    C2D,
    C2D_ACK,
    STATUS,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    TELEMETRY,
    TOPIC_ROOT,
    TRANSFER_RESPONSE,
    TWIN_DESIRED,
    TWIN_REPORTED,
    topic_for,
)
from fleetline.settings import MqttTarget
from fleetline_dev.simulated_updates import DeviceUpdates, FleetUpdates, UpdatePolicy

log = logging.getLogger(__name__)

FIRMWARE_VERSION = "1.0.3"
MODEL = "sim-th1"
# Share of ticks on which a device starts holding readings back to send them as a batch.
BATCH_PROBABILITY = 0.05
BATCH_READINGS = (2, 5)
# Readings a device keeps while its publishes fail; older ones are dropped.
MAX_BACKLOG_READINGS = 100
# Device starts are spread over one interval, but over no more than this.
MAX_STAGGER_SECONDS = 10.0
PUBLISH_TIMEOUT_SECONDS = 10.0
GOODBYE_TIMEOUT_SECONDS = 2.0
REPORT_INTERVAL_SECONDS = 30.0
# Ids of cloud-to-device messages a device remembers having handled (for duplicates).
SEEN_MESSAGE_IDS = 100
# The desired `interval_s` a device applies.
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0

Reading = dict[str, Any]


class ReadingLog(Protocol):
    """Told of each device's readings as they are published (again, after a failed
    publish) and once the broker acknowledged them: the whole-system tests keep each
    device's own log of what it may expect stored."""

    def published(self, device_id: str, readings: list[Reading]) -> None: ...

    def acked(self, device_id: str, readings: list[Reading]) -> None: ...

    def went_offline(self, device_id: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class OfflinePolicy:
    """Devices going offline now and then: on a tick, with ``probability``, a device
    disconnects for a time drawn from ``seconds`` (keeping up to MAX_BACKLOG_READINGS
    readings), then comes back and sends what it kept as one JSON array."""

    probability: float
    seconds: tuple[float, float] = (5.0, 20.0)


class Sensor(Protocol):
    """What a simulated device reads on each tick (its firmware version given). A sensor
    may also have ``units`` (metric name → unit), which the device reports in its twin."""

    def read(self, fw: str) -> Reading: ...


# A device's sensor, made from its own random generator (seeded with its id).
SensorFactory = Callable[[random.Random], Sensor]


class _Offline(Exception):
    """A device leaves on its own for a while (an OfflinePolicy)."""


@dataclass
class _State:
    """What the cloud may change on a device (its desired twin)."""

    interval_seconds: float


@dataclass
class _Stats:
    connected: int = 0
    readings: int = 0
    c2d_messages: int = 0
    method_calls: int = 0
    log: ReadingLog | None = None

    def publishing(self, device_id: str, readings: list[Reading]) -> None:
        if self.log is not None:
            self.log.published(device_id, list(readings))

    def acked(self, device_id: str, readings: list[Reading]) -> None:
        """The broker acknowledged these readings of the device."""
        self.readings += len(readings)
        if self.log is not None:
            self.log.acked(device_id, list(readings))


class _SeenIds:
    """The ids of the last messages handled, bounded (oldest forgotten first)."""

    def __init__(self, size: int = SEEN_MESSAGE_IDS) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, message_id: str) -> bool:
        """True the first time ``message_id`` is seen."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


async def _serve_cloud(
    client: mqtt.Client,
    device_id: str,
    seen: _SeenIds,
    stats: _Stats,
    state: _State,
    updates: DeviceUpdates | None,
) -> None:
    """Take what the cloud sends until the connection ends: cloud-to-device messages
    (acknowledged), the desired twin (applied and reported back; a rollout's `firmware`
    to the updates), direct methods (answered) and answers to transfer requests."""
    own = f"{TOPIC_ROOT}/{device_id}/"
    try:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else b""
            kind = message.topic.value.removeprefix(own)
            try:
                if kind == C2D:
                    await _take_c2d(client, device_id, orjson.loads(raw), seen, stats)
                elif kind == TWIN_DESIRED and raw:
                    doc = orjson.loads(raw)
                    await _apply_desired(client, device_id, doc, state)
                    if updates is not None:
                        updates.take_desired(client, doc["desired"].get("firmware"))
                elif kind == TRANSFER_RESPONSE and updates is not None:
                    updates.take_answer(raw)
                elif kind.startswith("methods/") and kind.endswith("/req"):
                    await _answer_method(client, device_id, kind, orjson.loads(raw), stats)
            except mqtt.MqttError:
                raise
            except Exception as exc:  # not of the protocol: a device ignores it
                log.debug("device %s ignored a message on %s: %r", device_id, kind, exc)
    except mqtt.MqttError as exc:  # the connection went; the device loop reconnects
        log.debug("device %s stops listening: %s", device_id, exc)


async def _take_c2d(
    client: mqtt.Client, device_id: str, doc: Any, seen: _SeenIds, stats: _Stats
) -> None:
    message_id = doc["id"]
    if type(message_id) is not str:
        raise TypeError("id is not a string")
    if seen.add(message_id):
        stats.c2d_messages += 1
        log.info(
            "device %s received a cloud-to-device message",
            device_id,
            extra={"device_id": device_id, "message_id": message_id},
        )
    await client.publish(
        topic_for(device_id, C2D_ACK),
        orjson.dumps({"id": message_id, "outcome": "complete"}),
        qos=1,
        timeout=PUBLISH_TIMEOUT_SECONDS,
    )


async def _apply_desired(client: mqtt.Client, device_id: str, doc: Any, state: _State) -> None:
    """Apply ``interval_s`` (seconds between readings, 0.1 to 3600) and report the
    desired properties back, with the version they came in (a rollout's `firmware` is
    reported by the update, not echoed)."""
    desired = doc["desired"]
    if type(desired) is not dict:
        raise TypeError("desired is not an object")
    desired = {k: v for k, v in desired.items() if k != "firmware"}
    interval = desired.get("interval_s")
    if isinstance(interval, int | float) and not isinstance(interval, bool):
        if MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
            state.interval_seconds = float(interval)
    await client.publish(
        topic_for(device_id, TWIN_REPORTED),
        orjson.dumps({**desired, "desired_version": doc["version"]}),
        qos=1,
        timeout=PUBLISH_TIMEOUT_SECONDS,
    )


async def _answer_method(
    client: mqtt.Client, device_id: str, kind: str, request: Any, stats: _Stats
) -> None:
    """``ping`` and ``reboot`` answer 200 (a reboot is pretended); others 404."""
    name = request["method"]
    stats.method_calls += 1
    if name == "ping":
        answer = {"status": 200, "payload": {"pong": True, "params": request.get("params")}}
    elif name == "reboot":
        answer = {"status": 200, "payload": {"rebooting": True}}
    else:
        answer = {"status": 404, "payload": {"error": f"no method {str(name)[:64]!r}"}}
    await client.publish(
        topic_for(device_id, kind.removesuffix("/req") + "/res"),
        orjson.dumps(answer),
        qos=1,
        timeout=PUBLISH_TIMEOUT_SECONDS,
    )


class _Sensors:
    """Plausible values: temperature and humidity drift around a set point."""

    # The metrics it reads that have a unit (door_open is a boolean, fw a text).
    units: Mapping[str, str] = {"temperature": "°C", "humidity": "%"}

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.temperature = rng.gauss(21.0, 1.0)
        self.humidity = rng.uniform(35.0, 55.0)

    def read(self, fw: str) -> Reading:
        rng = self.rng
        # Random walk pulled back towards 21 C / 45 %.
        self.temperature += rng.gauss(0, 0.15) - 0.05 * (self.temperature - 21.0)
        self.humidity += rng.gauss(0, 0.5) - 0.05 * (self.humidity - 45.0)
        self.humidity = min(100.0, max(0.0, self.humidity))
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "ts": now,
            "values": {
                "temperature": round(self.temperature, 2),
                "humidity": round(self.humidity, 1),
                "door_open": rng.random() < 0.03,
                "fw": fw,
            },
        }


def _units_of(sensor: Sensor) -> dict[str, str]:
    """The sensor's ``units`` (metric name → unit), if it has any."""
    units = getattr(sensor, "units", None)
    if not isinstance(units, Mapping):
        return {}
    return {str(name): unit for name, unit in units.items() if isinstance(unit, str) and unit}


def _birth_report(fw: str, units: Mapping[str, str]) -> dict[str, Any]:
    """What a device reports in its twin once connected: its firmware, its model and the
    units of its metrics (when it knows any)."""
    report: dict[str, Any] = {"fw": fw, "model": MODEL}
    if units:
        report["units"] = dict(units)
    return report


async def _reconnect_later(
    stop: asyncio.Event, what: str, ident: str, connected: bool, exc: BaseException, attempt: int
) -> None:
    """Log a lost (or refused) connection, then wait the backoff of ``attempt`` (from 1)
    or until ``stop``."""
    delay = backoff_seconds(attempt - 1)
    log.debug(
        "%s %s %s (%s); reconnecting in %.1f s",
        what,
        ident,
        "disconnected" if connected else "cannot connect",
        exc,
        delay,
        extra={"device_id": ident},
    )
    await _sleep_or_stop(stop, delay)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True as soon as ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    return stop.is_set()


async def _while_connected(
    client: mqtt.Client, work: Awaitable[object], *, timeout: float | None = None
) -> None:
    """Await ``work`` (at most ``timeout`` seconds); raise MqttError as soon as the
    connection drops.

    aiomqtt's publish keeps waiting for its PUBACK after the broker is gone, and a sleep
    would not notice at all: watching the connection starts the reconnect at once.
    """
    task = asyncio.ensure_future(work)
    lost = asyncio.ensure_future(wait_disconnected(client))
    try:
        await asyncio.wait(
            {task, lost},
            timeout=None if timeout is None else max(0.0, timeout),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        task.cancel()
        lost.cancel()
    if lost.done() and not lost.cancelled():
        # aiomqtt ends a connection with an MqttError, or with the socket's own error
        # (OSError) when a write fails.
        error = lost.exception()
        raise mqtt.MqttError(f"disconnected: {error or 'by the broker'}") from error
    if task.done() and not task.cancelled():
        task.result()


async def _say_offline(client: mqtt.Client, status_topic: str) -> None:
    """Best effort: a clean DISCONNECT does not fire the Will, so say it ourselves."""
    with contextlib.suppress(mqtt.MqttError, OSError):
        await client.publish(
            status_topic, STATUS_OFFLINE, qos=1, retain=True, timeout=GOODBYE_TIMEOUT_SECONDS
        )


async def _device(
    device_id: str,
    target: MqttTarget,
    *,
    interval_seconds: float,
    start_delay_seconds: float,
    stop: asyncio.Event,
    stats: _Stats,
    key: str | None,
    fleet_updates: FleetUpdates | None = None,
    offline: OfflinePolicy | None = None,
    sensor: SensorFactory | None = None,
    seed: str = "",
) -> None:
    status_topic = topic_for(device_id, STATUS)
    updates = (
        DeviceUpdates(fleet_updates, device_id, key, FIRMWARE_VERSION, MODEL)
        if fleet_updates is not None
        else None
    )
    if key is not None:
        # Log in as a device does: user name = client id = device id, password = its key.
        target = target.model_copy(update={"username": device_id, "password": SecretStr(key)})
    telemetry_topic = topic_for(device_id, TELEMETRY)
    client = make_client(
        target,
        identifier=device_id,
        # Small devices (mqtt_as on MicroPython) speak MQTT 3.1.1.
        protocol="3.1.1",
        persistent=False,
        will=mqtt.Will(status_topic, STATUS_OFFLINE, qos=1, retain=True),
    )
    rng = random.Random(f"{seed}/{device_id}" if seed else device_id)
    sensors = (sensor or _Sensors)(rng)
    units = _units_of(sensors)

    def fw() -> str:
        return updates.version if updates is not None else FIRMWARE_VERSION

    state = _State(interval_seconds)
    backlog: list[Reading] = []
    seen = _SeenIds()
    hold = 0  # ticks left before the held-back readings go out as one batch
    attempt = 0
    if await _sleep_or_stop(stop, start_delay_seconds):
        return
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        connected = False
        try:
            async with client:
                connected = True
                stats.connected += 1
                attempt = 0
                log.debug("device %s connected", device_id, extra={"device_id": device_id})
                receiver: asyncio.Task[None] | None = None
                try:
                    # Subscribed before saying online: the API sends queued messages as
                    # soon as it sees the status.
                    await client.subscribe(
                        [
                            (topic_for(device_id, C2D), 1),
                            (topic_for(device_id, TWIN_DESIRED), 1),
                            (topic_for(device_id, "methods/+/req"), 1),
                            (topic_for(device_id, TRANSFER_RESPONSE), 1),
                        ]
                    )
                    receiver = asyncio.create_task(
                        _serve_cloud(client, device_id, seen, stats, state, updates),
                        name=f"simulator.device[{device_id}].cloud",
                    )
                    await client.publish(status_topic, STATUS_ONLINE, qos=1, retain=True)
                    await client.publish(
                        topic_for(device_id, TWIN_REPORTED),
                        orjson.dumps(_birth_report(fw(), units)),
                        qos=1,
                    )
                    next_tick = loop.time()
                    while not stop.is_set():
                        backlog.append(sensors.read(fw()))
                        del backlog[:-MAX_BACKLOG_READINGS]
                        if hold == 0 and rng.random() < BATCH_PROBABILITY:
                            hold = rng.randint(*BATCH_READINGS) - 1
                        elif hold > 0:
                            hold -= 1
                        if hold == 0:
                            payload = backlog[0] if len(backlog) == 1 else backlog
                            stats.publishing(device_id, backlog)
                            publish = client.publish(
                                telemetry_topic,
                                orjson.dumps(payload),
                                qos=1,
                                timeout=PUBLISH_TIMEOUT_SECONDS,
                            )
                            await _while_connected(client, publish)
                            stats.acked(device_id, backlog)
                            backlog.clear()
                        next_tick += state.interval_seconds
                        if offline is not None and rng.random() < offline.probability:
                            raise _Offline
                        await _while_connected(client, stop.wait(), timeout=next_tick - loop.time())
                    await _say_offline(client, status_topic)
                except _Offline:
                    await _say_offline(client, status_topic)
                except asyncio.CancelledError:
                    await _say_offline(client, status_topic)
                    raise
                finally:
                    stats.connected -= 1
                    if receiver is not None:
                        receiver.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await receiver
        except (mqtt.MqttError, OSError) as exc:
            attempt += 1
            await _reconnect_later(stop, "device", device_id, connected, exc, attempt)
            continue
        if offline is not None and not stop.is_set():
            seconds = rng.uniform(*offline.seconds)
            if stats.log is not None:
                stats.log.went_offline(device_id, seconds)
            await _stay_offline(seconds, state, stop, lambda: sensors.read(fw()), backlog)
    if updates is not None:
        updates.stop()


async def _stay_offline(
    seconds: float,
    state: _State,
    stop: asyncio.Event,
    read: Callable[[], Reading],
    backlog: list[Reading],
) -> None:
    """Off the network for ``seconds``, still taking a reading each interval (the newest
    MAX_BACKLOG_READINGS kept for the reconnect)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        if await _sleep_or_stop(stop, min(state.interval_seconds, until - loop.time())):
            return
        backlog.append(read())
        del backlog[:-MAX_BACKLOG_READINGS]


async def _report(stats: _Stats, devices: int) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL_SECONDS)
        log.info(
            "simulator: %d/%d devices connected, %d readings sent, %d c2d messages received, "
            "%d method calls answered",
            stats.connected,
            devices,
            stats.readings,
            stats.c2d_messages,
            stats.method_calls,
        )


async def register_fleet(database_url: str, ids: list[str], key_secret: bytes) -> dict[str, str]:
    """Put the simulated fleet in the device registry, issuing a key to each device that
    has none, so devices may connect and the API serves their telemetry. Returns each
    device's current key, for the simulator to log in with."""
    if not ids:
        return {}
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            await con.execute(
                "INSERT INTO devices (id, tags) SELECT d, $2::text::jsonb "
                "FROM unnest($1::text[]) d ON CONFLICT (id) DO NOTHING",
                ids,
                '{"source": "simulator"}',
            )
            return await issue_keys(con, ids, key_secret)
    finally:
        await close_connection(con)


async def issue_keys(
    con: asyncpg.Connection[Any], ids: list[str], key_secret: bytes
) -> dict[str, str]:
    """Issue a key to each of the registered devices ``ids`` that has none (in the
    caller's transaction); each one's current key."""
    await con.execute(
        """
        UPDATE devices SET key_version = nextval('device_key_version_seq'),
                           key_created_at = now()
        WHERE id = ANY($1::text[]) AND key_version = 0
        """,
        ids,
    )
    rows = await con.fetch("SELECT id, key_version FROM devices WHERE id = ANY($1::text[])", ids)
    keys = {r["id"]: devicekeys.derive_key(key_secret, r["id"], r["key_version"]) for r in rows}
    await con.execute(
        """
        UPDATE devices d SET key_sha256 = u.f
        FROM unnest($1::text[], $2::bytea[]) u(id, f) WHERE d.id = u.id
        """,
        list(keys),
        [devicekeys.fingerprint(k) for k in keys.values()],
    )
    return keys


def device_ids(devices: int, prefix: str = "sim-") -> list[str]:
    """The ids the simulated fleet uses: sim-0000, sim-0001, ..."""
    width = max(4, len(str(devices - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(devices)]


async def run_fleet(
    target: MqttTarget,
    *,
    devices: int,
    interval_seconds: float,
    prefix: str = "sim-",
    stop: asyncio.Event | None = None,
    keys: Mapping[str, str] | None = None,
    updates: UpdatePolicy | None = None,
    offline: OfflinePolicy | None = None,
    reading_log: ReadingLog | None = None,
    sensor: SensorFactory | None = None,
    seed: str = "",
) -> None:
    """Run ``devices`` simulated devices until ``stop`` is set (or the task is cancelled).

    A device listed in ``keys`` logs in with its key, as the broker's auth plugin
    requires; the others with ``target``'s credentials. With ``updates``, the devices
    take firmware rollouts (simulated_updates.py); with ``offline``, they leave for a
    while now and then and send their backlog when back. ``reading_log`` is told of every
    reading published and acknowledged; ``sensor`` makes what the devices read
    (temperature, humidity, a door and the firmware version by default). Each device's
    random choices (values, batches, offline periods) come from its id, and ``seed``.

    On stop every device publishes a retained ``offline`` and disconnects cleanly.
    """
    if devices <= 0:
        return
    if interval_seconds <= 0:
        raise ValueError("interval_seconds must be positive")
    stop = stop or asyncio.Event()
    stats = _Stats(log=reading_log)
    ids = device_ids(devices, prefix)
    stagger = min(interval_seconds, MAX_STAGGER_SECONDS) / devices
    log.info(
        "simulating %d devices (%s...) every %.1f s on %s:%d",
        devices,
        ids[0],
        interval_seconds,
        target.host,
        target.port,
    )
    fleet_updates = FleetUpdates(updates) if updates is not None else None
    try:
        await _run(
            ids,
            target,
            interval_seconds,
            stagger,
            stop,
            stats,
            keys,
            fleet_updates,
            offline,
            sensor,
            seed,
        )
    finally:
        if fleet_updates is not None:
            await fleet_updates.aclose()
    log.info("simulator stopped: %d readings sent", stats.readings)


async def _run(
    ids: list[str],
    target: MqttTarget,
    interval_seconds: float,
    stagger: float,
    stop: asyncio.Event,
    stats: _Stats,
    keys: Mapping[str, str] | None,
    fleet_updates: FleetUpdates | None,
    offline: OfflinePolicy | None,
    sensor: SensorFactory | None,
    seed: str,
) -> None:
    async with asyncio.TaskGroup() as tg:
        reporter = tg.create_task(_report(stats, len(ids)), name="simulator.report")
        device_tasks = [
            tg.create_task(
                _device(
                    device_id,
                    target,
                    interval_seconds=interval_seconds,
                    start_delay_seconds=i * stagger,
                    stop=stop,
                    stats=stats,
                    key=(keys or {}).get(device_id),
                    fleet_updates=fleet_updates,
                    offline=offline,
                    sensor=sensor,
                    seed=seed,
                ),
                name=f"simulator.device[{device_id}]",
            )
            for i, device_id in enumerate(ids)
        ]
        await asyncio.gather(*device_tasks)
        reporter.cancel()
