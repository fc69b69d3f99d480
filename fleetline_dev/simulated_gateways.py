"""Simulated gateways for the simulated fleet (docs/gateways.md): each gateway is one MQTT
connection of its own, logged in with its own key, publishing for its children on the
children's own topics, ``devices/{child}/...``.

A gateway (MQTT 5, a retained ``offline`` Last Will on its own status):

- subscribes, for itself and for each child, to ``c2d``, ``twin/desired`` and
  ``methods/+/req``. A child the registry does not know yet is created by the broker's
  auth plugin on this first use, as the gateway's child: :func:`register_gateways`
  registers each gateway with ``create_children`` and a pattern its children's ids
  match, and with limits that leave room for its children;
- says itself ``online``, then each child (retained), and reports ``{"fw", "model"}``
  for itself and for each child (a child's with the ``units`` of its readings);
- publishes each child's readings (the simulated devices' shape), one batch (a JSON
  array) per child per interval: the readings the child took since its last batch went
  out, one unless a publish failed;
- answers for itself and for its children as a simulated device does (simulator.py):
  cloud-to-device messages acknowledged (acted on once per id), the desired twin applied
  (each child its own ``interval_s``) and reported back, ``ping`` and ``reboot``
  answered 200, other methods 404;
- on stop, says each child ``offline``, then itself. Its session is not kept: after a
  reconnection it subscribes and announces its children again.

Children are named ``{gateway}-c{i}`` (``sim-gw-00-c000``, ...). Firmware updates are not
simulated behind a gateway: a desired ``firmware`` is not acted on. Gateways and
children are tagged ``source=simulated-gateway`` (not ``simulator``: a rollout to the
simulated devices does not reach them).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from pydantic import SecretStr

from fleetline import limits, mqtt
from fleetline.db import close_connection
from fleetline.mqtt import make_client
from fleetline.protocol import (
    C2D,
    STATUS,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    TELEMETRY,
    TOPIC_ROOT,
    TWIN_DESIRED,
    TWIN_REPORTED,
    topic_for,
)
from fleetline.settings import MqttTarget
from fleetline_dev.simulated_updates import UpdatePolicy
from fleetline_dev.simulator import (
    FIRMWARE_VERSION,
    GOODBYE_TIMEOUT_SECONDS,
    MAX_BACKLOG_READINGS,
    MAX_STAGGER_SECONDS,
    PUBLISH_TIMEOUT_SECONDS,
    REPORT_INTERVAL_SECONDS,
    Reading,
    ReadingLog,
    _answer_method,
    _apply_desired,
    _reconnect_later,
    _SeenIds,
    _Sensors,
    _sleep_or_stop,
    _State,
    _Stats,
    _take_c2d,
    _while_connected,
    issue_keys,
    run_fleet,
)

log = logging.getLogger(__name__)

GATEWAY_MODEL = "sim-gw1"
CHILD_MODEL = "sim-ble1"
TAGS = {"source": "simulated-gateway"}
# What a gateway subscribes to for itself and for each child.
CLOUD_TOPICS = (C2D, TWIN_DESIRED, "methods/+/req")
# Topic filters in one SUBSCRIBE at most (three per child).
SUBSCRIBE_FILTERS = 300


def gateway_ids(gateways: int, prefix: str = "sim-gw-") -> list[str]:
    """The ids the simulated gateways use: sim-gw-00, sim-gw-01, ..."""
    width = max(2, len(str(gateways - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(gateways)]


def child_ids(gateway_id: str, children: int) -> list[str]:
    """The ids of a simulated gateway's children: {gateway}-c000, {gateway}-c001, ..."""
    width = max(3, len(str(children - 1)))
    return [f"{gateway_id}-c{i:0{width}d}" for i in range(children)]


def child_id_pattern(gateway_id: str) -> str:
    """The PostgreSQL regular expression the whole id of each of a gateway's children
    matches (a device id's only special character is the dot)."""
    return gateway_id.replace(".", "\\.") + "-c[0-9]+"


def policy(gateway_id: str, children: int) -> dict[str, Any]:
    """A simulated gateway's policy: it creates its children (ids of
    :func:`child_id_pattern`, tagged like the gateways) on their first message."""
    return {
        "create_children": True,
        "child_id_pattern": child_id_pattern(gateway_id),
        "child_tags": TAGS,
        "max_children": max(children, 1000),
    }


async def register_gateways(
    database_url: str, ids: list[str], key_secret: bytes, *, children: int
) -> dict[str, str]:
    """Put the simulated gateways in the device registry as gateways that create their
    children on first use (ids of :func:`child_id_pattern`, tagged like the gateways),
    issuing a key to each that has none. A device of that id registered before becomes a
    gateway unless it is one already (its policy is kept) or is behind one.

    Each gateway's publishes for its children count against its own limits: it gets the
    default limits times ``children + 1`` (a device's share for itself and each child,
    within the API's bounds), as its override (``device:{id}``; a larger override
    already there is kept).

    Returns each gateway's current key, for the simulator to log in with."""
    if not ids:
        return {}
    policies = [orjson.dumps(policy(g, children)).decode() for g in ids]
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            await con.execute(
                """
                INSERT INTO devices (id, tags, gateway)
                SELECT u.id, $3::text::jsonb, u.policy::jsonb
                FROM unnest($1::text[], $2::text[]) u(id, policy)
                ON CONFLICT (id) DO UPDATE SET gateway = EXCLUDED.gateway
                WHERE devices.gateway IS NULL AND devices.parent_id IS NULL
                """,
                ids,
                policies,
                orjson.dumps(TAGS).decode(),
            )
            default = await con.fetchrow(
                f"SELECT {', '.join(limits.MOST)} FROM device_limits WHERE selector = 'default'"
            )
            if default is not None:
                overrides = {
                    r["device_id"]: dict(r)
                    for r in await con.fetch(
                        f"SELECT device_id, {', '.join(limits.MOST)} FROM device_limits"
                        " WHERE selector = ANY($1::text[])",
                        [f"device:{g}" for g in ids],
                    )
                }
                rows = []
                for g in ids:
                    wanted = limits.scaled(dict(default), children + 1, overrides.get(g))
                    rows.append((f"device:{g}", g, *(wanted[name] for name in limits.MOST)))
                await con.executemany(
                    f"""
                    INSERT INTO device_limits (selector, device_id, {", ".join(limits.MOST)})
                    VALUES ($1, $2, $3, $4, $5, $6)
                    ON CONFLICT (selector) DO UPDATE SET  -- never lower (a PUT since read)
                        messages_per_second = greatest(device_limits.messages_per_second,
                                                       EXCLUDED.messages_per_second),
                        burst_messages = greatest(device_limits.burst_messages,
                                                  EXCLUDED.burst_messages),
                        bytes_per_second = greatest(device_limits.bytes_per_second,
                                                    EXCLUDED.bytes_per_second),
                        burst_bytes = greatest(device_limits.burst_bytes, EXCLUDED.burst_bytes),
                        updated_at = now()
                    """,
                    rows,
                )
            return await issue_keys(con, ids, key_secret)
    finally:
        await close_connection(con)


@dataclass
class _Node:
    """The gateway itself or one of its children: what the cloud may change on it, the
    messages it handled, and (a child) its readings not yet sent."""

    id: str
    state: _State
    sensors: _Sensors
    seen: _SeenIds = field(default_factory=_SeenIds)
    backlog: list[Reading] = field(default_factory=list)


def _node(device_id: str, interval_seconds: float) -> _Node:
    return _Node(device_id, _State(interval_seconds), _Sensors(random.Random(device_id)))


async def _all(publishes: list[Awaitable[None]]) -> None:
    """Await every publish (each has its timeout); raise the first error."""
    results = await asyncio.gather(*publishes, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _publish(
    client: mqtt.Client, device_id: str, kind: str, payload: bytes, *, retain: bool = False
) -> Awaitable[None]:
    return client.publish(
        topic_for(device_id, kind),
        payload,
        qos=1,
        retain=retain,
        timeout=PUBLISH_TIMEOUT_SECONDS,
    )


async def _subscribe(client: mqtt.Client, gateway_id: str, ids: list[str]) -> None:
    """Subscribe to what the cloud sends the gateway and each child (a few SUBSCRIBEs);
    say which the broker refused."""
    filters = [(topic_for(d, kind), 1) for d in ids for kind in CLOUD_TOPICS]
    refused: list[str] = []
    for at in range(0, len(filters), SUBSCRIBE_FILTERS):
        chunk = filters[at : at + SUBSCRIBE_FILTERS]
        codes = await client.subscribe(chunk, timeout=PUBLISH_TIMEOUT_SECONDS)
        for (topic, _qos), code in zip(chunk, codes, strict=False):
            # MQTT 3.1.1's granted QoS (an int), MQTT 5's reason codes.
            value = code if isinstance(code, int) else getattr(code, "value", 0)
            if isinstance(value, int) and value >= 0x80:
                refused.append(topic)
    if refused:
        log.warning(
            "gateway %s: the broker refused %d subscriptions (%s, ...): see "
            "GET /v1/devices/%s/refusals",
            gateway_id,
            len(refused),
            refused[0],
            gateway_id,
            extra={"device_id": gateway_id},
        )


async def _serve_cloud(client: mqtt.Client, nodes: Mapping[str, _Node], stats: _Stats) -> None:
    """Take what the cloud sends the gateway and its children until the connection ends,
    and answer for each as a simulated device does."""
    try:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else b""
            root, _, rest = message.topic.value.partition("/")
            device_id, _, kind = rest.partition("/")
            node = nodes.get(device_id) if root == TOPIC_ROOT else None
            if node is None:
                continue
            try:
                if kind == C2D:
                    await _take_c2d(client, device_id, orjson.loads(raw), node.seen, stats)
                elif kind == TWIN_DESIRED and raw:
                    await _apply_desired(client, device_id, orjson.loads(raw), node.state)
                elif kind.startswith("methods/") and kind.endswith("/req"):
                    await _answer_method(client, device_id, kind, orjson.loads(raw), stats)
            except mqtt.MqttError:
                raise
            except Exception as exc:  # not of the protocol: ignored, as a device does
                log.debug("%s ignored a message on %s: %r", device_id, kind, exc)
    except mqtt.MqttError as exc:  # the connection went; the gateway loop reconnects
        log.debug("gateway stops listening: %s", exc)


async def _child_readings(
    client: mqtt.Client, child: _Node, start_delay_seconds: float, stats: _Stats
) -> None:
    """A child's readings, one a tick, published by the gateway as one batch per tick:
    what the child took since its last batch went out (kept when a publish fails)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(start_delay_seconds)
    next_tick = loop.time()
    while True:
        child.backlog.append(child.sensors.read(FIRMWARE_VERSION))
        del child.backlog[:-MAX_BACKLOG_READINGS]
        batch = list(child.backlog)
        stats.publishing(child.id, batch)
        try:
            await _publish(client, child.id, TELEMETRY, orjson.dumps(batch))
        except mqtt.MqttError as exc:
            log.debug("child %s: readings kept for the next batch: %s", child.id, exc)
        else:
            del child.backlog[: len(batch)]
            stats.acked(child.id, batch)
        # A slow publish skips the ticks it took rather than catching up in a burst.
        next_tick = max(next_tick + child.state.interval_seconds, loop.time())
        await asyncio.sleep(next_tick - loop.time())


async def _goodbye(client: mqtt.Client, gateway_id: str, children: list[str]) -> None:
    """Best effort: each child ``offline``, then the gateway (a clean DISCONNECT does not
    fire the Will)."""
    try:
        await _all(
            [
                client.publish(
                    topic_for(c, STATUS),
                    STATUS_OFFLINE,
                    qos=1,
                    retain=True,
                    timeout=GOODBYE_TIMEOUT_SECONDS,
                )
                for c in children
            ]
        )
        await client.publish(
            topic_for(gateway_id, STATUS),
            STATUS_OFFLINE,
            qos=1,
            retain=True,
            timeout=GOODBYE_TIMEOUT_SECONDS,
        )
    except (mqtt.MqttError, OSError) as exc:
        log.debug("gateway %s: goodbye cut short: %s", gateway_id, exc)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


async def _session(
    client: mqtt.Client,
    itself: _Node,
    children: dict[str, _Node],
    stop: asyncio.Event,
    stats: _Stats,
) -> None:
    """One connection of the gateway, until ``stop`` (then the goodbye) or until the
    connection drops (MqttError)."""
    gateway_id = itself.id
    nodes = {gateway_id: itself, **children}
    receiver = asyncio.create_task(
        _serve_cloud(client, nodes, stats), name=f"simulator.gateway[{gateway_id}].cloud"
    )
    readers: list[asyncio.Task[None]] = []
    try:
        # Subscribed before saying online: the API sends queued messages as soon as it
        # sees a status. A child's first subscription creates it.
        await _subscribe(client, gateway_id, list(nodes))
        await _publish(client, gateway_id, STATUS, STATUS_ONLINE, retain=True)
        await _publish(
            client,
            gateway_id,
            TWIN_REPORTED,
            orjson.dumps({"fw": FIRMWARE_VERSION, "model": GATEWAY_MODEL}),
        )
        await _all([_publish(client, c, STATUS, STATUS_ONLINE, retain=True) for c in children])
        reported = orjson.dumps(
            {"fw": FIRMWARE_VERSION, "model": CHILD_MODEL, "units": dict(_Sensors.units)}
        )
        await _all([_publish(client, c, TWIN_REPORTED, reported) for c in children])
        # The children's batches spread over one interval, as the devices' starts are.
        stagger = min(itself.state.interval_seconds, MAX_STAGGER_SECONDS) / max(1, len(children))
        readers = [
            asyncio.create_task(
                _child_readings(client, child, i * stagger, stats),
                name=f"simulator.child[{child.id}]",
            )
            for i, child in enumerate(children.values())
        ]
        await _while_connected(client, stop.wait())
        await _cancel(readers)
        await _goodbye(client, gateway_id, list(children))
    except asyncio.CancelledError:
        await _cancel(readers)
        await _goodbye(client, gateway_id, list(children))
        raise
    finally:
        await _cancel(readers)
        await _cancel([receiver])


async def _gateway(
    gateway_id: str,
    children: list[str],
    target: MqttTarget,
    *,
    interval_seconds: float,
    start_delay_seconds: float,
    stop: asyncio.Event,
    stats: _Stats,
    key: str | None,
) -> None:
    status_topic = topic_for(gateway_id, STATUS)
    if key is not None:
        # Logs in as a device does: user name = client id = its id, password = its key.
        target = target.model_copy(update={"username": gateway_id, "password": SecretStr(key)})
    client = make_client(
        target,
        identifier=gateway_id,
        # A gateway is a larger box than a sensor: MQTT 5, refusals answered in PUBACKs.
        protocol="5",
        persistent=False,
        will=mqtt.Will(status_topic, STATUS_OFFLINE, qos=1, retain=True),
    )
    itself = _node(gateway_id, interval_seconds)
    nodes = {c: _node(c, interval_seconds) for c in children}
    attempt = 0
    if await _sleep_or_stop(stop, start_delay_seconds):
        return
    while not stop.is_set():
        connected = False
        try:
            async with client:
                connected = True
                attempt = 0
                stats.connected += 1
                log.debug("gateway %s connected", gateway_id, extra={"device_id": gateway_id})
                try:
                    await _session(client, itself, nodes, stop, stats)
                finally:
                    stats.connected -= 1
        except (mqtt.MqttError, OSError) as exc:
            attempt += 1
            await _reconnect_later(stop, "gateway", gateway_id, connected, exc, attempt)


async def _report(stats: _Stats, gateways: int, children: int) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL_SECONDS)
        log.info(
            "simulator: %d/%d gateways connected (%d children each), %d children's readings "
            "sent, %d c2d messages received, %d method calls answered",
            stats.connected,
            gateways,
            children,
            stats.readings,
            stats.c2d_messages,
            stats.method_calls,
        )


async def run_gateways(
    target: MqttTarget,
    *,
    gateways: int,
    children: int,
    interval_seconds: float,
    prefix: str = "sim-gw-",
    stop: asyncio.Event | None = None,
    keys: Mapping[str, str] | None = None,
    reading_log: ReadingLog | None = None,
) -> None:
    """Run ``gateways`` simulated gateways with ``children`` children each until ``stop``
    is set (or the task is cancelled); each child takes a reading every
    ``interval_seconds``; ``reading_log`` is told of every child's reading published
    and acknowledged.

    A gateway listed in ``keys`` logs in with its key, as the broker's auth plugin
    requires (:func:`register_gateways` registers them); the others with ``target``'s
    credentials. On stop every gateway says its children and itself offline and
    disconnects cleanly.
    """
    if gateways <= 0:
        return
    if children < 0:
        raise ValueError("children must not be negative")
    if interval_seconds <= 0:
        raise ValueError("interval_seconds must be positive")
    stop = stop or asyncio.Event()
    stats = _Stats(log=reading_log)
    ids = gateway_ids(gateways, prefix)
    stagger = min(interval_seconds, MAX_STAGGER_SECONDS) / gateways
    log.info(
        "simulating %d gateways (%s...) with %d children each, a reading every %.1f s, on %s:%d",
        gateways,
        ids[0],
        children,
        interval_seconds,
        target.host,
        target.port,
    )
    async with asyncio.TaskGroup() as tg:
        reporter = tg.create_task(_report(stats, gateways, children), name="simulator.gateways")
        tasks = [
            tg.create_task(
                _gateway(
                    gateway_id,
                    child_ids(gateway_id, children),
                    target,
                    interval_seconds=interval_seconds,
                    start_delay_seconds=i * stagger,
                    stop=stop,
                    stats=stats,
                    key=(keys or {}).get(gateway_id),
                ),
                name=f"simulator.gateway[{gateway_id}]",
            )
            for i, gateway_id in enumerate(ids)
        ]
        await asyncio.gather(*tasks)
        reporter.cancel()
    log.info("simulated gateways stopped: %d children's readings sent", stats.readings)


async def run_devices_and_gateways(
    target: MqttTarget,
    *,
    devices: int,
    gateways: int,
    children_per_gateway: int,
    interval_seconds: float,
    stop: asyncio.Event,
    keys: Mapping[str, str],
    prefix: str = "sim-",
    gateway_prefix: str = "sim-gw-",
    updates: UpdatePolicy | None = None,
) -> None:
    """The simulated devices (:func:`run_fleet`) and gateways (:func:`run_gateways`)
    together, until ``stop`` is set: what ``fleetline up`` and ``fleetline simulate``
    run."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(
            run_fleet(
                target,
                devices=devices,
                interval_seconds=interval_seconds,
                prefix=prefix,
                stop=stop,
                keys=keys,
                updates=updates,
            ),
            name="simulator.devices",
        )
        tg.create_task(
            run_gateways(
                target,
                gateways=gateways,
                children=children_per_gateway,
                interval_seconds=interval_seconds,
                prefix=gateway_prefix,
                stop=stop,
                keys=keys,
            ),
            name="simulator.gateways",
        )
