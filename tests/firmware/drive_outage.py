"""Run by the MicroPython unix port, not by CPython (tests/firmware/test_outage.py).

The device core with micropython-lib's umqtt.simple, as drive_readings.py wires them,
through a relay the test cuts and restores: it sends ``live`` readings, then the test
cuts the link; the device keeps taking readings into its backlog until it holds
``backlog`` of them (the sensor pauses there, so none is dropped for lack of room); the
test restores the link, the device flushes the backlog, takes ``after`` more readings,
sends them, says offline and disconnects.

What the test reads on stdout: the core's log; ``reading {...}`` for each reading taken
(its JSON as published); ``state C B S`` whenever connected (0/1), the backlog's length
or the readings sent change; last, ``result {...}``: the counters, the MemoryErrors the
core logged, and the heap (its live high-water mark, sampled after a collection
around each publish only: unlike drive_readings.py, not in every pass of the loop,
since collecting that often keeps the heap unfragmented and hid the MemoryErrors a
flush used to raise in a 64K heap).

``fail_every`` > 0 injects a MemoryError while the core builds a batch: the heap is
locked (``micropython.heap_lock``: every allocation raises MemoryError) while the core
builds the first and then every ``fail_every``-th payload of more than one reading, as
a heap too full or too fragmented for it would.

    micropython -X heapsize=64K drive_outage.py ID KEY HOST PORT LIVE BACKLOG AFTER \
        INTERVAL_S FAIL_EVERY
"""

import gc
import json
import sys
import time

import fleetline_device
import micropython
from umqtt.simple import MQTTClient

# Give up (exit 2) when the readings are not all sent by then.
DEADLINE_S = 90

peak = [0]
# 0: the heap is not sampled (no collections but the allocator's and the core's own).
MEASURE = sys.argv[10] != "0" if len(sys.argv) > 10 else True


def sample() -> None:
    if not MEASURE:
        return
    gc.collect()
    used = gc.mem_alloc()
    if used > peak[0]:
        peak[0] = used


class MeasuredClient(MQTTClient):
    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        sample()
        super().publish(topic, msg, retain, qos)
        sample()


def main() -> int:
    device_id, key, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    live, backlog, after = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    interval_s, fail_every = float(sys.argv[8]), int(sys.argv[9])
    total = live + backlog + after
    taken = [0]
    memory_errors = [0]
    injected = [0]
    device = None

    def log(text: str) -> None:
        if "MemoryError" in text:
            memory_errors[0] += 1
        print(text)  # noqa: T201 - the test reads stdout

    def read_sensors() -> dict:
        if taken[0] >= total:
            return {}  # no values: no reading
        if taken[0] >= live and device.client is not None and device.readings_sent < live:
            return {}
        if device.client is None and len(device.backlog) >= backlog:
            return {}  # paused: the backlog is as long as the test wants
        if taken[0] >= live + backlog and device.readings_sent < live + backlog:
            return {}  # the rest only once the backlog is out
        taken[0] += 1
        return {"n": taken[0]}

    started = time.ticks_ms()
    shown = [None]

    def feed() -> None:
        state = (1 if device.client is not None else 0, len(device.backlog),
                 device.readings_sent)
        if state != shown[0]:
            shown[0] = state
            print("state " + " ".join([str(v) for v in state]))  # noqa: T201
        late = time.ticks_diff(time.ticks_ms(), started) > DEADLINE_S * 1000
        if device.readings_sent >= total or late:
            device.stop()

    device = fleetline_device.Device(
        device_id, key, host, port,
        mqtt_client=MeasuredClient,
        read_sensors=read_sensors,
        interval_s=interval_s,
        feed=feed,
        log=log,
        backoff_min_s=0.2,
        backoff_max_s=1,
    )
    if fail_every > 0:
        # A heap too full or too fragmented for the payload, at every fail_every-th
        # batch the core builds: its allocations fail while it builds that one.
        build = device._payload
        calls = [0]

        def failing_payload(count: int) -> bytes:
            if count > 1:
                calls[0] += 1
            if count > 1 and (calls[0] - 1) % fail_every == 0:
                injected[0] += 1
                micropython.heap_lock()
                try:
                    return build(count)
                finally:
                    micropython.heap_unlock()
            return build(count)

        device._payload = failing_payload
    take_reading = device.take_reading

    def take_and_show() -> None:
        before = device.readings_taken
        take_reading()
        if device.readings_taken > before:
            print("reading " + device.backlog[-1].decode())  # noqa: T201

    device.take_reading = take_and_show
    device.run()
    sample()
    print("result " + json.dumps({  # noqa: T201
        "connects": device.connects,
        "readings_taken": device.readings_taken,
        "readings_sent": device.readings_sent,
        "readings_dropped": device.readings_dropped,
        "memory_errors": memory_errors[0],
        "memory_errors_counted": getattr(device, "memory_errors", None),
        "injected": injected[0],
        "last_error": repr(device.last_error) if device.last_error is not None else None,
        "heap_peak": peak[0],
        "heap_total": gc.mem_alloc() + gc.mem_free(),
    }))
    return 0 if device.readings_sent == total else 2


sys.exit(main())
