"""A BLE gateway (docs/gateways.md): the sensors it hears that speak BTHome v2
(fleetline_bthome) become its children, ``ble-<12 hex digits of the MAC>``, which it
publishes for on their own topics over its own connection.

The gateway is a device like any other (fleetline_device.Device: its login, Last Will,
twin, methods, backlog and reconnection); this module is an extension of it (like the
updater: ``connected()``, ``step()``, ``on_transfer()``), plus its hook for messages on
topics not its own (``Device.on_message``). For each child it:

- subscribes to ``devices/{child}/c2d``, ``twin/desired`` and ``methods/+/req``, then
  publishes ``online`` (retained) on ``devices/{child}/status`` when it is first heard,
  and again after each reconnection of the gateway; ``offline`` (retained) once it has
  not been heard for ``offline_after_s``;
- publishes its readings on ``devices/{child}/telemetry`` (QoS 1, ``ts`` when the clock
  is set): one per new measurement (a repeated advert is no new reading), at most one
  every ``interval_s`` (the child's desired ``interval_s``; the configured default
  otherwise);
- reports ``mac``, ``model`` (the advertised name), ``rssi`` (when it moved by
  ``rssi_step_db``) and ``battery`` on ``devices/{child}/twin/reported`` when they
  change, and ``units`` (metric → unit, fleetline_bthome) once for each metric with a
  unit when its first reading is queued;
- answers a rollout (its desired ``firmware``) at once with ``reported.firmware``
  ``failed``: a BTHome sensor takes no firmware update;
- answers the methods ``identify`` (what the gateway knows of it: last seen, signal,
  battery, last values) and ``ping``; any other 404;
- acknowledges cloud-to-device messages (``complete``, once per id; a handler may
  reject them).

How the two loops run together: BLE scanning is aioble's, asyncio-based; the device
core is a synchronous step loop. :meth:`Gateway.run` runs one asyncio loop with two
tasks: the scan task (consecutive ``aioble.scan`` windows of ``scan_ms``, each
advert handed to :meth:`Gateway.heard`, which only updates memory and queues readings),
and the device task, which calls ``Device.run_once()`` (connect, or one step: the
socket, the inbox, this extension's step, the gateway's own readings) and then awaits
the wait it returns in slices of ``SLICE_MS``, so the scan task runs between steps.
A step blocks the loop while it waits on the network (each publish and subscription
for its broker's answer, so a step does at most ``SUBSCRIBE_PER_STEP`` children's
subscriptions and ``PUBLISH_PER_STEP`` telemetry messages; a connection attempt up to
the socket timeout); meanwhile the BLE stack keeps delivering adverts into aioble's
queue, which a handler installed before aioble's bounds (:meth:`_irq`: adverts that
carry no BTHome data are not queued at all, and at most ``MAX_PENDING_ADVERTS`` wait).

Bounded memory: at most ``max_children`` children (a new sensor takes the place of the
one heard longest ago among those already offline, else it is ignored and counted);
readings wait in one :class:`Queue` of ``queue_readings`` slots allocated at start (the
oldest dropped and counted when full) while the broker is unreachable or busy; the
gateway's own readings in the device's backlog, cut to ``OWN_BACKLOG_READINGS``;
incoming messages go through the device's bounded inbox; aioble's results are let go
once read. Malformed adverts and messages are counted and dropped, never raised out of
the loop.

MicroPython only (asyncio with ``sleep_ms``, aioble, ``time.ticks_ms``).
"""

import asyncio
import binascii
import gc
import json
import time

import aioble
import fleetline_bthome
import fleetline_device

CHILD_PREFIX = "ble-"
MAX_CHILDREN = 32
OFFLINE_AFTER_S = 60
QUEUE_READINGS = 100
# Readings of one child per telemetry message when the queue is sent.
BATCH_READINGS = 25
# A child's readings at most this often (s; 0: each new measurement); its desired
# interval_s overrides it. 32 children then make about 3 readings a second.
CHILD_INTERVAL_S = 10
MAX_CHILD_INTERVAL_S = 86400
# rssi is reported again when it moved by this much (dB): not at every advert.
RSSI_STEP_DB = 5
# One scan window (ms); the next starts at once.
SCAN_MS = 5000
# Passive scanning, 30 ms of every 320 ms: room for the Wi-Fi beside it.
SCAN_INTERVAL_US = 320000
SCAN_WINDOW_US = 30000
SCAN_RETRY_MS = 2000
# Adverts waiting in aioble's queue while the loop is busy; beyond, dropped and counted.
MAX_PENDING_ADVERTS = 24
# The gateway's own readings (its counters) kept while offline: its children's matter more.
OWN_BACKLOG_READINGS = 10
# The device task's slices: between two, the scan task runs.
SLICE_MS = 20
# Children subscribed (3 topics each), and telemetry messages sent, per pass of the
# device's loop: each waits for the broker's answer (umqtt.simple sends a message in
# several small writes, so one can take a round trip and a delayed acknowledgement), and
# the scans wait meanwhile.
SUBSCRIBE_PER_STEP = 1
PUBLISH_PER_STEP = 4
# A child the broker refused is tried again after this long (its registry may change).
REFUSED_RETRY_S = 300
# Cloud-to-device message ids remembered (over all children) to act once on each.
SEEN_C2D_IDS = 32

_IRQ_SCAN_RESULT = 5
_CHILD_KINDS = ("c2d", "twin/desired", "methods/+/req")


def _print(text: str) -> None:
    print(text)  # noqa: T201 - the serial console is the board's log


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_object(msg: object) -> object:
    """A message's JSON object, or None (not JSON, not an object, too large)."""
    if msg is None:
        return None
    try:
        doc = json.loads(msg)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class Child:
    """What the gateway keeps of one sensor: few members (an instance's members are a
    hash table, which grows with them), nothing derived (its topics, its last values)."""

    def __init__(self, addr: bytes, now: int, interval_s: float) -> None:
        self.addr = addr
        self.seen = now  # ticks_ms of the last advert heard
        self.data = None  # the last BTHome data read (bytes): a repeat is no reading
        self.sent_at = None  # ticks_ms of the last reading queued
        self.interval_s = interval_s
        self.desired_version = -1
        self.rssi = None
        self.reported_rssi = None
        self.battery = None
        self.model = None
        self.report = {"mac": binascii.hexlify(addr, ":").decode()}  # to publish, or None
        self.subscribed = False  # in this connection
        self.online = None  # what its status said (None: to be said, in this connection)
        self.refused_at = None  # ticks_ms the broker refused its topics
        self.units = 0  # the metrics whose unit it reports (fleetline_bthome.unit_mask)
        self.rollout = None  # the last rollout answered (its notification stays desired)

    def id(self) -> str:
        return CHILD_PREFIX + binascii.hexlify(self.addr).decode()

    def topic(self, kind: str) -> str:
        return "devices/" + self.id() + "/" + kind

    def alive(self, now: int, offline_after_ms: int) -> bool:
        return time.ticks_diff(now, self.seen) < offline_after_ms

    def report_(self, name: str, value: object) -> None:
        if self.report is None:
            self.report = {}
        self.report[name] = value


class Queue:
    """Readings waiting to be sent, at most ``size``, oldest first; when full, the oldest
    goes. Each is its child, its ts (epoch ms, or None) and the BTHome data it was read
    from (its JSON, three times that size, is written when it is sent). Three lists of
    ``size`` slots, allocated once as a ring: a list that grows is copied into a larger
    block, which a fragmented heap may not have."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.child = [None] * size
        self.ts = [None] * size
        self.data = [None] * size
        self.head = 0  # the oldest slot in use
        self.span = 0  # the slots from the oldest to the newest, sent ones between too
        self.count = 0  # the readings held

    def put(self, child: Child, ts: object, data: bytes) -> bool:
        """One more reading; True when the oldest was dropped for it."""
        dropped = False
        if self.span == self.size:  # the oldest goes (a send never runs meanwhile)
            self._clear(self.head)
            self._advance()
            dropped = True
        at = (self.head + self.span) % self.size
        self.child[at] = child
        self.ts[at] = ts
        self.data[at] = data
        self.span += 1
        self.count += 1
        return dropped

    def oldest(self, limit: int) -> list:
        """The slots of the oldest reading's child's readings, oldest first, at most
        ``limit``."""
        first = None
        out = []
        for k in range(self.span):
            at = (self.head + k) % self.size
            child = self.child[at]
            if child is None:
                continue
            if first is None:
                first = child
            if child is first:
                out.append(at)
                if len(out) >= limit:
                    break
        return out

    def remove(self, slots: list) -> None:
        for at in slots:
            self._clear(at)
        self._advance()

    def _clear(self, at: int) -> None:
        if self.child[at] is not None:
            self.child[at] = None
            self.ts[at] = None
            self.data[at] = None
            self.count -= 1

    def _advance(self) -> None:
        while self.span and self.child[self.head] is None:
            self.head = (self.head + 1) % self.size
            self.span -= 1


class Gateway:
    """The children of one gateway device; :meth:`run` runs the device and the scans.

    ``on_child_c2d(child_id, body, properties)``: acts on a message to a child;
    returning False or raising rejects it (default: logged and completed)."""

    def __init__(
        self,
        *,
        max_children: int = MAX_CHILDREN,
        offline_after_s: float = OFFLINE_AFTER_S,
        queue_readings: int = QUEUE_READINGS,
        child_interval_s: float = CHILD_INTERVAL_S,
        rssi_step_db: int = RSSI_STEP_DB,
        scan_ms: int = SCAN_MS,
        scan_interval_us: int = SCAN_INTERVAL_US,
        scan_window_us: int = SCAN_WINDOW_US,
        on_child_c2d: object = None,
        log: object = None,
    ) -> None:
        self.max_children = max_children
        self.offline_after_ms = int(offline_after_s * 1000)
        self.queue_readings = max(1, queue_readings)
        self.child_interval_s = child_interval_s
        self.rssi_step_db = rssi_step_db
        self.scan_ms = scan_ms
        self.scan_interval_us = scan_interval_us
        self.scan_window_us = scan_window_us
        self._on_child_c2d = on_child_c2d
        self._log = log or _print
        self.device = None
        self.children = {}  # MAC (6 bytes) -> Child
        self.queue = Queue(self.queue_readings)
        self._batch_readings = BATCH_READINGS
        self._leaving = []  # topics' bases of children let go, to unsubscribe
        self._seen_c2d = []  # (child's MAC, message id, outcome), oldest first
        self._central = None  # aioble.central, once the scans run
        # What happened (the gateway's own telemetry, :meth:`sensors`).
        self.adverts = 0  # BTHome adverts handed over by aioble
        self.adverts_other = 0  # adverts without BTHome data (not queued by aioble)
        self.adverts_malformed = 0  # broken AD structures or BTHome data
        self.adverts_partial = 0  # read up to an object id unknown here
        self.adverts_dropped = 0  # beyond MAX_PENDING_ADVERTS while the loop was busy
        self.sensors_ignored = 0  # new sensors heard with max_children already online
        self.readings_queued = 0
        self.readings_sent = 0
        self.readings_dropped = 0  # the oldest, from a full queue
        self.messages_bad = 0  # children's messages that were not what they should be
        self.refusals = 0  # children's topics the broker refused
        self.scans = 0
        self.scan_errors = 0
        self.errors = 0  # anything else an advert raised (counted, never raised)

    # -- wiring ----------------------------------------------------------------------

    def attach(self, device: object) -> None:
        """Ride on ``device`` (a fleetline_device.Device): its connection, its loop."""
        self.device = device
        device.backlog_readings = min(device.backlog_readings, OWN_BACKLOG_READINGS)
        device.extensions.append(self)
        device.on_message = self._on_message
        device._methods["children"] = self._list_children  # the gateway's own method

    def sensors(self, read: object = None) -> object:
        """The gateway's own readings: ``read()``'s (the board's) and its counters."""

        def read_all() -> dict:
            values = read() if read is not None else {}
            now = time.ticks_ms()
            online = 0
            for child in self.children.values():
                if child.alive(now, self.offline_after_ms):
                    online += 1
            values["children"] = len(self.children)
            values["children_online"] = online
            values["adverts"] = self.adverts
            values["adverts_malformed"] = self.adverts_malformed
            values["adverts_dropped"] = self.adverts_dropped
            values["sensors_ignored"] = self.sensors_ignored
            values["queue"] = self.queue.count
            values["readings_dropped"] = self.readings_dropped
            return values

        return read_all

    def run(self, device: object = None) -> None:
        """Until ``device.stop()``: the device's loop and the BLE scans, in one asyncio
        loop; then each child online says ``offline`` and the device disconnects."""
        if device is not None:
            self.attach(device)
        asyncio.run(self._main())

    async def _main(self) -> None:
        scan = asyncio.create_task(self._scan())
        try:
            await self._serve()
        finally:
            scan.cancel()
            await asyncio.sleep_ms(0)  # let the scan task end (aioble stops the scan)

    async def _serve(self) -> None:
        device = self.device
        while not device.stopping:
            wait_ms = device.run_once()
            start = time.ticks_ms()
            while True:
                device.tick()
                left = wait_ms - time.ticks_diff(time.ticks_ms(), start)
                await asyncio.sleep_ms(SLICE_MS if left > SLICE_MS else max(0, left))
                if left <= SLICE_MS or device.stopping:
                    break
        self._goodbye()

    def _goodbye(self) -> None:
        device = self.device
        if device.client is not None:
            try:
                for child in self.children.values():
                    if child.online and child.refused_at is None:
                        device.publish(child.topic("status"), fleetline_device.STATUS_OFFLINE,
                                       retain=True)
                        child.online = False
            except Exception as exc:  # the device's goodbye closes it either way
                self._log("gateway: goodbye failed: " + repr(exc))
        device._goodbye()

    # -- BLE -------------------------------------------------------------------------

    async def _scan(self) -> None:
        self._guard()
        while not self.device.stopping:
            try:
                async with aioble.scan(self.scan_ms, self.scan_interval_us,
                                       self.scan_window_us, active=False) as scanner:
                    # aioble keeps each device's result for the scan window, to hand over
                    # only what changed; the gateway compares adverts itself, so a result
                    # is let go once read: memory does not grow with the sensors around.
                    results = getattr(scanner, "_results", None)
                    async for result in scanner:
                        self.heard(result.device.addr, result.rssi, result.adv_data)
                        if results is not None:
                            results.discard(result)
                self.scans += 1
            except Exception as exc:  # the BLE stack (OSError): try again shortly
                self.scan_errors += 1
                self._log("gateway: scan failed: " + repr(exc))
                await asyncio.sleep_ms(SCAN_RETRY_MS)

    def _guard(self) -> None:
        """Put :meth:`_irq` before aioble's own handler of the BLE events."""
        try:
            from aioble import central, core

            core._irq_handlers.insert(0, self._irq)
            self._central = central
        except Exception as exc:  # another aioble: its queue is then not bounded here
            self._log("gateway: aioble's queue is not bounded: " + repr(exc))

    def _irq(self, event: int, data: object) -> object:
        """Before aioble's handler (a result that is not None ends the event there): an
        advert without BTHome data, or one more than MAX_PENDING_ADVERTS waiting while
        the loop is busy, is not queued."""
        if event != _IRQ_SCAN_RESULT:
            return None
        scanner = self._central._active_scanner
        if scanner is None:
            return None
        if not fleetline_bthome.carries_service_data(data[4]):
            self.adverts_other += 1
            return False
        if len(scanner._queue) >= MAX_PENDING_ADVERTS:
            self.adverts_dropped += 1
            return False
        return None

    def heard(self, addr: bytes, rssi: int, adv: object) -> None:
        """An advert from the sensor with MAC ``addr``: the child updated, a reading
        queued when it is new. Whatever the advert holds, nothing is raised."""
        try:
            self._heard(addr, rssi, adv)
        except MemoryError:
            self.errors += 1
            gc.collect()
        except Exception as exc:  # a bug must cost one advert, not the gateway
            self.errors += 1
            self._log("gateway: advert not read: " + repr(exc))

    def _heard(self, addr: bytes, rssi: int, adv: object) -> None:
        if adv is None:
            return
        try:
            data = fleetline_bthome.service_data(adv)
        except ValueError:
            self.adverts_malformed += 1
            return
        if data is None:
            self.adverts_other += 1
            return
        self.adverts += 1
        now = time.ticks_ms()
        child = self.children.get(addr)
        data = bytes(data)
        if child is not None and data == child.data:  # the same measurement again
            self._seen(child, now, rssi)
            return
        try:
            values, unknown = fleetline_bthome.decode(data)
        except ValueError:
            self.adverts_malformed += 1
            return
        if unknown is not None:
            self.adverts_partial += 1
        values.pop("packet_id", None)
        if child is None:
            child = self._adopt(addr, now)
            if child is None:
                return
        self._seen(child, now, rssi)
        child.data = data
        model = fleetline_bthome.name(adv)
        if model is not None and model != child.model:
            child.model = model
            child.report_("model", model)
        battery = values.get("battery")
        if battery is not None and battery != child.battery:
            child.battery = battery
            child.report_("battery", battery)
        if not values:
            return
        if child.sent_at is not None and \
                time.ticks_diff(now, child.sent_at) < child.interval_s * 1000:
            return
        child.sent_at = now
        new = fleetline_bthome.unit_mask(data) & ~child.units
        if new:  # metrics sent for the first time: their units, merged into the twin's
            child.units |= new
            # A mask (a small int) until it is published: no dict per child meanwhile.
            child.report_("units", new | (child.report.get("units", 0) if child.report else 0))
        # Without a clock, no ts: ingest stamps the reading on arrival.
        self._queue(child, fleetline_device.epoch_ms() if fleetline_device.clock_valid()
                    else None, data)

    def _seen(self, child: Child, now: int, rssi: int) -> None:
        child.seen = now
        child.rssi = rssi
        if child.reported_rssi is None or abs(rssi - child.reported_rssi) >= self.rssi_step_db:
            child.reported_rssi = rssi
            child.report_("rssi", rssi)

    def _adopt(self, addr: bytes, now: int) -> object:
        """A new child; with max_children already, in place of the one heard longest
        ago among those offline (its topics unsubscribed), or none."""
        if len(self.children) >= self.max_children:
            oldest = None
            for child in self.children.values():
                if child.online is not True and not child.alive(now, self.offline_after_ms) and (
                        oldest is None or time.ticks_diff(child.seen, oldest.seen) < 0):
                    oldest = child
            if oldest is None:
                self.sensors_ignored += 1
                return None
            del self.children[oldest.addr]
            if oldest.subscribed:
                self._leaving.append(oldest.topic(""))
            self._log("gateway: " + oldest.id() + " let go for a new sensor")
        child = Child(addr, now, self.child_interval_s)
        self.children[addr] = child
        self._log("gateway: heard " + child.id())
        return child

    def _queue(self, child: Child, ts: object, data: bytes) -> None:
        self.readings_queued += 1
        if self.queue.put(child, ts, data):
            self.readings_dropped += 1

    # -- the device's extension ------------------------------------------------------

    def connected(self) -> None:
        """After each (re)connection: every child subscribed and its status said again
        (the broker forgot the subscriptions; retained statuses may be stale)."""
        self._leaving = []
        for child in self.children.values():
            child.subscribed = False
            child.online = None

    def on_transfer(self, msg: object) -> None:
        pass  # firmware transfers are the device's own (fleetline_ota)

    def step(self) -> None:
        """One pass of the device's loop while connected: subscriptions, statuses,
        reported properties, then the queued readings. A broken connection raises (the
        device reconnects)."""
        device = self.device
        while self._leaving:
            base = self._leaving[-1]
            for kind in _CHILD_KINDS:
                device.client.unsubscribe((base + kind).encode())
            self._leaving.pop()
        now = time.ticks_ms()
        budget = SUBSCRIBE_PER_STEP
        settled = True  # every child heard is subscribed and its status said
        for child in self.children.values():  # heard() cannot run meanwhile
            alive = child.alive(now, self.offline_after_ms)
            if child.refused_at is not None:
                if time.ticks_diff(now, child.refused_at) < REFUSED_RETRY_S * 1000:
                    continue
                child.refused_at = None
            if alive and not child.subscribed:
                if budget == 0:
                    settled = False
                    continue  # the next pass
                budget -= 1
                if not self._subscribe(child):
                    continue
            if alive != child.online:  # None too: not said yet in this connection
                # Offline too when it was never said online here: a status retained
                # before a reset of the gateway may say otherwise.
                device.publish(child.topic("status"), fleetline_device.STATUS_ONLINE if alive
                               else fleetline_device.STATUS_OFFLINE, retain=True)
                if not alive:
                    self._log("gateway: " + child.id() + " not heard: offline")
                child.online = alive
            if child.report and child.subscribed:
                report = child.report
                units = report.get("units", 0)  # a mask until now (_heard)
                if units:
                    report["units"] = fleetline_bthome.units(units)
                try:
                    device.publish(child.topic("twin/reported"), json.dumps(report))
                finally:
                    if units:  # kept as a mask, should the publish fail
                        report["units"] = units
                child.report = None
        if settled:  # readings after their child's status
            self._flush()

    def _subscribe(self, child: Child) -> bool:
        """The child's topics; what arrives meanwhile (its retained desired twin) is
        handled after each child, so the device's bounded inbox never overflows."""
        device = self.device
        try:
            for kind in _CHILD_KINDS:
                device.client.subscribe(child.topic(kind).encode(), qos=1)
        except Exception as exc:
            # umqtt.simple raises MQTTException(0x80) for a refused subscription, the
            # stream intact: not a broken connection.
            if type(exc).__name__ != "MQTTException":
                raise
            self.refusals += 1
            child.refused_at = time.ticks_ms()
            self._log("gateway: the broker refused " + child.id() + "'s topics")
            return False
        child.subscribed = True
        device._handle_inbox()
        return True

    def _flush(self) -> None:
        """Queued readings, by child (up to BATCH_READINGS in one message, up to
        PUBLISH_PER_STEP messages); each leaves the queue once the broker acknowledged
        it. Those of a child whose topics are refused are dropped."""
        device = self.device
        queue = self.queue
        budget = PUBLISH_PER_STEP
        while queue.count and device.client is not None and budget > 0:
            picked = queue.oldest(self._batch_readings)
            child = queue.child[picked[0]]
            if child.refused_at is None:
                try:
                    payload = self._payload(picked)
                except MemoryError:
                    gc.collect()
                    if len(picked) > 1:  # smaller batches from now on
                        self._batch_readings = max(1, len(picked) // 2)
                        continue
                    payload = None  # not even one reading fits: it is dropped
                if payload is None:
                    self.readings_dropped += 1
                    queue.remove(picked)
                    continue
                device.publish(child.topic("telemetry"), payload)
                payload = None
                budget -= 1
                self.readings_sent += len(picked)
            else:
                self.readings_dropped += len(picked)
            queue.remove(picked)
        if not queue.count:
            self._batch_readings = BATCH_READINGS

    def _payload(self, picked: list) -> str:
        """The readings at ``picked``: one as a JSON object, several as an array."""
        queue = self.queue
        readings = []
        for at in picked:
            values = fleetline_bthome.decode(queue.data[at])[0]  # read once already
            values.pop("packet_id", None)
            reading = {"values": values}
            if queue.ts[at] is not None:
                reading["ts"] = queue.ts[at]
            readings.append(reading)
        return json.dumps(readings[0] if len(readings) == 1 else readings)

    # -- from the cloud, to a child --------------------------------------------------

    def _child(self, child_id: str) -> object:
        if len(child_id) != len(CHILD_PREFIX) + 12 or not child_id.startswith(CHILD_PREFIX):
            return None
        try:
            return self.children.get(binascii.unhexlify(child_id[len(CHILD_PREFIX):]))
        except ValueError:
            return None

    def _on_message(self, topic: str, msg: object) -> None:
        """The device's hook: a message on a child's topic (``msg`` None: larger than
        the device takes)."""
        if not topic.startswith("devices/"):
            return
        at = topic.find("/", 8)
        child = self._child(topic[8:at]) if at > 0 else None
        if child is None:  # let go meanwhile
            self.messages_bad += 1
            return
        kind = topic[at + 1 :]
        if kind == "c2d":
            self._take_c2d(child, msg)
        elif kind == "twin/desired":
            self._take_desired(child, msg)
        elif kind.startswith("methods/") and kind.endswith("/req"):
            self._answer(child, kind[8:-4], msg)
        else:
            self.messages_bad += 1

    def _answer(self, child: Child, request_id: str, msg: object) -> None:
        if msg is None:
            status, payload = 413, {"error": "request too large"}
        else:
            doc = _json_object(msg)
            name = doc.get("method") if doc is not None else None
            if not isinstance(name, str):
                self.messages_bad += 1
                status, payload = 400, {"error": "no method name"}
            elif name == "identify":
                status, payload = 200, self._identify(child)
            elif name == "ping":
                status, payload = 200, {"pong": True, "params": doc.get("params")}
            else:
                status, payload = 404, {"error": "no method '" + name[:64] + "'"}
        self.device.publish(child.topic("methods/" + request_id + "/res"),
                            json.dumps({"status": status, "payload": payload}))

    def _identify(self, child: Child) -> dict:
        values = None
        if child.data is not None:
            values = fleetline_bthome.decode(child.data)[0]  # read once already
            values.pop("packet_id", None)
        return {
            "mac": binascii.hexlify(child.addr, ":").decode(),
            "gateway": self.device.device_id,
            "last_seen_s": time.ticks_diff(time.ticks_ms(), child.seen) // 1000,
            "online": child.online is True,
            "rssi": child.rssi,
            "battery": child.battery,
            "model": child.model,
            "values": values,
            "interval_s": child.interval_s,
        }

    def _take_c2d(self, child: Child, msg: object) -> None:
        doc = _json_object(msg)
        message_id = doc.get("id") if doc is not None else None
        if not isinstance(message_id, str):
            self.messages_bad += 1
            self._log("gateway: a message to " + child.id() + " without an id")
            return
        outcome = None
        for seen in self._seen_c2d:  # delivered at least once: acted on once
            if seen[1] == message_id and seen[0] == child.addr:
                outcome = seen[2]
        if outcome is None:
            outcome = "complete"
            try:
                if self._on_child_c2d is None:
                    self._log("gateway: c2d to " + child.id() + ": " + json.dumps(doc.get("body")))
                elif self._on_child_c2d(child.id(), doc.get("body"),
                                        doc.get("properties") or {}) is False:
                    outcome = "reject"
            except Exception as exc:
                self._log("gateway: c2d handler failed: " + repr(exc))
                outcome = "reject"
            self._seen_c2d.append((child.addr, message_id, outcome))
            if len(self._seen_c2d) > SEEN_C2D_IDS:
                del self._seen_c2d[0]
        self.device.publish(child.topic("c2d/ack"),
                            json.dumps({"id": message_id, "outcome": outcome}))

    def _take_desired(self, child: Child, msg: object) -> None:
        """``interval_s``: the child's readings at most this often (s, 0 to 86,400;
        absent: the configured default). Reported with ``desired_version``, and
        ``desired_errors`` for what could not be applied. ``firmware`` (a rollout): the
        rollout's own report, ``failed`` at once (docs/ota.md): a BTHome sensor takes
        no update."""
        if msg is not None and len(msg) == 0:  # the retained document was cleared
            return
        doc = _json_object(msg)
        version = doc.get("version") if doc is not None else None
        desired = doc.get("desired") if doc is not None else None
        if not isinstance(version, int) or not isinstance(desired, dict):
            self.messages_bad += 1
            return
        if version <= child.desired_version:  # a late publish
            return
        errors = {}
        value = desired.get("interval_s")
        if value is None:
            child.interval_s = self.child_interval_s
        elif _is_number(value) and 0 <= value <= MAX_CHILD_INTERVAL_S:
            child.interval_s = value
        else:
            errors["interval_s"] = "interval_s must be a number from 0 to " + str(
                MAX_CHILD_INTERVAL_S) + ", not " + repr(value)[:40]
        value = desired.get("firmware")
        rollout = value.get("rollout") if isinstance(value, dict) else None
        if isinstance(rollout, int) and not isinstance(rollout, bool):
            if rollout != child.rollout:  # once: its notification stays in the desired twin
                child.rollout = rollout
                release = value.get("version")
                child.report_("firmware", {
                    "rollout": rollout, "state": "failed", "progress": None,
                    "version": release if isinstance(release, str) else None, "running": None,
                    "reason": "a BLE sensor behind gateway " + self.device.device_id
                    + ": it takes no firmware updates",
                })
        elif value is not None:
            errors["firmware"] = "firmware must be a rollout's notification, not " + repr(
                value)[:40]
        for name in desired:
            if name != "interval_s" and name != "firmware":
                errors[name] = "unknown here"
        child.desired_version = version
        child.report_("interval_s", child.interval_s)
        child.report_("desired_version", version)
        child.report_("desired_errors", errors or None)

    def _list_children(self, params: object) -> dict:
        """The gateway's own method ``children``: each child, its signal and age."""
        now = time.ticks_ms()
        out = {}
        for child in self.children.values():
            out[child.id()] = {
                "online": child.online is True,
                "rssi": child.rssi,
                "last_seen_s": time.ticks_diff(now, child.seen) // 1000,
            }
        return {"children": out, "max_children": self.max_children}


def from_config(config: object, log: object = None) -> Gateway:
    """A gateway with the settings of ``config_local.py`` (firmware/README.md,
    "Gateway")."""
    return Gateway(
        max_children=getattr(config, "GATEWAY_MAX_CHILDREN", MAX_CHILDREN),
        offline_after_s=getattr(config, "GATEWAY_OFFLINE_AFTER_S", OFFLINE_AFTER_S),
        queue_readings=getattr(config, "GATEWAY_QUEUE_READINGS", QUEUE_READINGS),
        child_interval_s=getattr(config, "GATEWAY_CHILD_INTERVAL_S", CHILD_INTERVAL_S),
        rssi_step_db=getattr(config, "GATEWAY_RSSI_STEP_DB", RSSI_STEP_DB),
        scan_ms=getattr(config, "GATEWAY_SCAN_MS", SCAN_MS),
        scan_interval_us=getattr(config, "GATEWAY_SCAN_INTERVAL_US", SCAN_INTERVAL_US),
        scan_window_us=getattr(config, "GATEWAY_SCAN_WINDOW_US", SCAN_WINDOW_US),
        log=log,
    )
