"""Run by the MicroPython unix port, not by CPython (tests/firmware/test_unix_port.py).

The device core (firmware/common/fleetline_device.py) with micropython-lib's
umqtt.simple as its client, as firmware/common/main.py wires them, takes ``readings``
readings ``interval_s`` apart, sends each, says offline and disconnects. Prints the
core's log, one ``reading {...}`` line per reading taken (its JSON as it is published)
and, last, one ``result {...}`` line: the device's counters and the heap.

The heap's high-water mark is of live data: the heap is collected and measured in every
pass of the device's loop (its ``feed`` hook) and around each call into umqtt.simple.
Uncollected garbage is left out; it is what the GC reclaims when an allocation needs it.

    micropython -X heapsize=110K drive_readings.py DEVICE_ID KEY HOST PORT READINGS INTERVAL_S
"""

import gc
import json
import sys
import time

gc.collect()
HEAP_BEFORE_IMPORTS = gc.mem_alloc()

import fleetline_device  # noqa: E402 - measured after the heap's starting point
from umqtt.simple import MQTTClient  # noqa: E402

# Give up (exit 2) when the readings are not all sent by then.
DEADLINE_S = 60

peak = [0]


def sample() -> None:
    gc.collect()
    used = gc.mem_alloc()
    if used > peak[0]:
        peak[0] = used


sample()
HEAP_AFTER_IMPORTS = gc.mem_alloc()


class MeasuredClient(MQTTClient):
    """umqtt.simple's MQTTClient unchanged; only the heap is sampled around its calls."""

    def connect(self, clean_session: bool = True, timeout: object = None) -> int:
        sample()
        present = super().connect(clean_session, timeout)
        sample()
        return present

    def subscribe(self, topic: bytes, qos: int = 0) -> None:
        sample()
        super().subscribe(topic, qos)
        sample()

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        sample()
        super().publish(topic, msg, retain, qos)
        sample()

    def check_msg(self) -> object:
        op = super().check_msg()
        sample()
        return op


def main() -> int:
    device_id, key, host = sys.argv[1], sys.argv[2], sys.argv[3]
    port, readings, interval_s = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    taken = [0]
    device = None

    def read_sensors() -> dict:
        if taken[0] >= readings:
            return {}  # no values: no reading
        taken[0] += 1
        return {"n": taken[0]}

    started = time.ticks_ms()

    def feed() -> None:
        sample()
        late = time.ticks_diff(time.ticks_ms(), started) > DEADLINE_S * 1000
        if device.readings_sent >= readings or late:
            device.stop()

    device = fleetline_device.Device(
        device_id, key, host, port,
        mqtt_client=MeasuredClient,
        read_sensors=read_sensors,
        interval_s=interval_s,
        feed=feed,
        backoff_min_s=0.2,
        backoff_max_s=1,
    )
    take_reading = device.take_reading

    def take_and_show() -> None:
        before = device.readings_taken
        take_reading()
        if device.readings_taken > before:
            print("reading " + device.backlog[-1].decode())  # noqa: T201 - the test reads stdout

    device.take_reading = take_and_show
    device.run()
    sample()
    print("result " + json.dumps({  # noqa: T201
        "connects": device.connects,
        "readings_taken": device.readings_taken,
        "readings_sent": device.readings_sent,
        "readings_dropped": device.readings_dropped,
        "messages_dropped": device.messages_dropped,
        "last_error": repr(device.last_error) if device.last_error is not None else None,
        "heap_peak": peak[0],
        "heap_total": gc.mem_alloc() + gc.mem_free(),
        "heap_before_imports": HEAP_BEFORE_IMPORTS,
        "heap_after_imports": HEAP_AFTER_IMPORTS,
    }))
    return 0 if device.readings_sent == readings else 2


sys.exit(main())
