# A fake of MicroPython's low-level `bluetooth` module for the gateway on the unix port
# (tests/firmware/test_gateway.py): the unix port has no radio. micropython-lib's aioble
# runs on top of it unchanged; what it needs for scanning is here: BLE.active(),
# config(), irq(handler) and gap_scan(), and the events _IRQ_SCAN_RESULT (addr_type,
# addr, adv_type, rssi, adv_data; addr and adv_data as memoryviews, as the real stack
# gives them) and _IRQ_SCAN_DONE.
#
# The radio's world is a scenario, the file `ble.jsonl` in the folder FLEETLINE_FAKES
# names, one sensor a line (read again whenever it changes, so a test makes a sensor
# appear or disappear by rewriting it; write it whole and rename it over the old one):
#
#   {"addr": "a4c138000001", "addr_type": 0, "rssi": -60, "every_ms": 500,
#    "adv_type": 0, "adverts": ["0201061609d2fc40...", ...]}
#
# Each sensor advertises every `every_ms`, its `adverts` (advertising data, hex) in turn;
# a scan hears every advert (an ideal radio). The events are delivered by an asyncio
# task the scan starts, as the BLE stack delivers them between the application's own
# work. The file `ble_events` in that folder counts what was delivered ("results N",
# "scans N") and the heap the scenario takes ("scenario_bytes N": a board's radio keeps
# its state outside MicroPython's heap, so a test takes it out of what it measures).
import asyncio
import binascii
import gc
import json
import os
import time

FOLDER = os.getenv("FLEETLINE_FAKES") or "."
SCENARIO = FOLDER + "/ble.jsonl"
TICK_MS = 10  # how often the radio looks at its sensors' schedules

_IRQ_SCAN_RESULT = 5
_IRQ_SCAN_DONE = 6

FLAG_BROADCAST = 0x0001
FLAG_READ = 0x0002
FLAG_WRITE_NO_RESPONSE = 0x0004
FLAG_WRITE = 0x0008
FLAG_NOTIFY = 0x0010
FLAG_INDICATE = 0x0020
FLAG_AUTHENTICATED_SIGNED_WRITE = 0x0040
FLAG_AUX_WRITE = 0x0100
FLAG_READ_ENCRYPTED = 0x0200
FLAG_READ_AUTHENTICATED = 0x0400
FLAG_READ_AUTHORIZED = 0x0800
FLAG_WRITE_ENCRYPTED = 0x1000
FLAG_WRITE_AUTHENTICATED = 0x2000
FLAG_WRITE_AUTHORIZED = 0x4000


class UUID:
    def __init__(self, value):
        if isinstance(value, int):
            self.value = value
        elif isinstance(value, str):
            self.value = value
        else:
            data = bytes(value)
            self.value = data[0] | data[1] << 8 if len(data) == 2 else data

    def __eq__(self, other):
        return isinstance(other, UUID) and self.value == other.value

    def __hash__(self):
        return hash(self.value)

    def __str__(self):
        if isinstance(self.value, int):
            return "UUID(" + hex(self.value) + ")"
        return "UUID(" + repr(self.value) + ")"


class _Sensor:
    def __init__(self, spec, now):
        self.addr = binascii.unhexlify(spec["addr"].replace(":", ""))
        self.addr_type = spec.get("addr_type", 0)
        self.rssi = spec.get("rssi", -60)
        self.adv_type = spec.get("adv_type", 0)
        self.every_ms = spec.get("every_ms", 1000)
        self.adverts = tuple(binascii.unhexlify(a) for a in spec.get("adverts", ()))
        self.next = 0
        # Sensors do not advertise in step: each starts at its own point of its period.
        self.due = time.ticks_add(now, (self.addr[-1] * 37 + self.addr[-2] * 11) % self.every_ms)


class BLE:
    def __init__(self):
        self._active = False
        self._handler = None
        self._scanning = None  # the delivery task of the scan running
        self._stamp = None
        self._sensors = {}
        self._results = 0
        self._scans = 0
        self._footprint = 0
        self._config = {
            "mac": (0, b"\x02\x00\x00\x00\x00\x01"),
            "gap_name": "fake",
            "rxbuf": 256,
            "mtu": 23,
        }

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)
        if not on and self._scanning is not None:
            self._scanning.cancel()
            self._scanning = None
        return self._active

    def config(self, *args, **kwargs):
        if args:
            return self._config[args[0]]
        self._config.update(kwargs)
        return None

    def irq(self, handler):
        self._handler = handler

    def gap_scan(self, duration_ms, interval_us=1280000, window_us=11250, active=False):
        if not self._active:
            raise OSError(1)  # EPERM, as the real stack says when it is off
        if self._scanning is not None:
            self._scanning.cancel()
            self._scanning = None
            if duration_ms is None:
                # Stopped: the stack says so a moment later.
                asyncio.create_task(self._done_later())
                return
        elif duration_ms is None:
            return
        self._scans += 1
        self._scanning = asyncio.create_task(self._deliver(duration_ms))

    async def _done_later(self):
        await asyncio.sleep_ms(1)
        self._note()
        self._handler(_IRQ_SCAN_DONE, ())

    def _reload(self):
        try:
            stat = os.stat(SCENARIO)
        except OSError:
            return
        stamp = (stat[6], stat[8])
        if stamp == self._stamp:
            return
        now = time.ticks_ms()
        old = self._sensors
        self._sensors = None
        gc.collect()
        before = gc.mem_alloc()
        sensors = {}
        try:
            with open(SCENARIO) as f:
                for line in f:
                    if line.strip():
                        sensor = _Sensor(json.loads(line), now)
                        sensors[sensor.addr] = sensor
        except (OSError, ValueError):
            self._sensors = old
            return  # being written: the last one stands
        self._stamp = stamp
        for addr, sensor in sensors.items():
            if addr in old:  # the same sensor goes on where it was
                sensor.next, sensor.due = old[addr].next, old[addr].due
        old = None
        gc.collect()
        self._footprint = gc.mem_alloc() - before
        self._sensors = sensors

    async def _deliver(self, duration_ms):
        started = time.ticks_ms()
        try:
            while not duration_ms or time.ticks_diff(time.ticks_ms(), started) < duration_ms:
                self._reload()
                now = time.ticks_ms()
                while True:
                    # After a while without the loop (the application busy), what was
                    # sent meanwhile comes in the order it was sent, as from the radio
                    # (the earliest due first; no list made: the heap is the gateway's).
                    sensor = None
                    for candidate in self._sensors.values():
                        if candidate.adverts and time.ticks_diff(now, candidate.due) >= 0:
                            if sensor is None or time.ticks_diff(candidate.due, sensor.due) < 0:
                                sensor = candidate
                    if sensor is None:
                        break
                    adv = sensor.adverts[sensor.next % len(sensor.adverts)]
                    sensor.next += 1
                    # Its next advert in its own phase (those it sent while the loop was
                    # away are one: the scan hears its latest).
                    sensor.due = time.ticks_add(sensor.due, sensor.every_ms)
                    late = time.ticks_diff(now, sensor.due)
                    if late >= 0:
                        periods = late // sensor.every_ms + 1
                        sensor.due = time.ticks_add(sensor.due, periods * sensor.every_ms)
                    self._results += 1
                    self._handler(
                        _IRQ_SCAN_RESULT,
                        (
                            sensor.addr_type,
                            memoryview(sensor.addr),
                            sensor.adv_type,
                            sensor.rssi,
                            memoryview(adv),
                        ),
                    )
                await asyncio.sleep_ms(TICK_MS)
        except asyncio.CancelledError:
            return
        self._scanning = None
        self._note()
        self._handler(_IRQ_SCAN_DONE, ())

    def _note(self):
        with open(FOLDER + "/ble_events", "w") as f:
            f.write(
                "results "
                + str(self._results)
                + "\nscans "
                + str(self._scans)
                + "\nscenario_bytes "
                + str(self._footprint)
                + "\n"
            )

    # What aioble's other parts call: not needed by a scanning gateway.
    def gap_advertise(self, *args, **kwargs):
        raise OSError(95)  # EOPNOTSUPP

    def gap_connect(self, *args, **kwargs):
        raise OSError(95)

    def gap_disconnect(self, *args, **kwargs):
        raise OSError(95)

    def gatts_register_services(self, *args, **kwargs):
        raise OSError(95)
