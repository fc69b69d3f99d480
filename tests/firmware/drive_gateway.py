"""Run by the MicroPython unix port, not by CPython (tests/firmware/test_gateway.py).

The gateway (firmware/common/fleetline_gateway.py) on the device core with
micropython-lib's umqtt.simple and aioble, the radio the fake ``bluetooth`` module
(tests/firmware/fakes) playing the scenario in ``$FLEETLINE_FAKES/ble.json``. Runs until
the file ``stop`` appears in that folder (then says offline, for the children too, and
disconnects) or for ``run_s``.

Prints the log, a ``state {...}`` line whenever the gateway's counters change (at most
every 200 ms) and, last, ``result {...}``: the counters and the heap. The heap's
high-water mark is of live data: collected and measured every ``sample_ms`` (in the
device's ``feed`` hook) and around each publish. The fake radio's module is imported
first and measured apart (``fake_radio_module``): a board's ``bluetooth`` is built into
its firmware and its state is outside MicroPython's heap.

    micropython -X heapsize=110K drive_gateway.py settings.json

with the settings as JSON in a file (the unix port does not start with a long argument):
``{"device_id", "key", "host", "port", "auth", "interval_s", "run_s", "sample_ms",
"gateway": {keyword arguments of fleetline_gateway.Gateway}}``.
"""

import gc
import json
import os
import sys
import time

gc.collect()
HEAP_BEFORE_IMPORTS = gc.mem_alloc()

# The fake radio first, measured apart: a board's `bluetooth` is built into its firmware.
import bluetooth  # noqa: E402, F401

gc.collect()
FAKE_RADIO = gc.mem_alloc() - HEAP_BEFORE_IMPORTS

import fleetline_device  # noqa: E402 - measured after the heap's starting point
import fleetline_gateway  # noqa: E402
from umqtt.simple import MQTTClient  # noqa: E402

FOLDER = os.getenv("FLEETLINE_FAKES") or "."
peak = [0]
# What the gateway held when the peak was sampled: its children, its queue, the device's
# own backlog, the adverts waiting in aioble's queue.
at_peak = {}
running = []  # the gateway and the device, once made


def sample() -> None:
    gc.collect()
    used = gc.mem_alloc()
    if used > peak[0]:
        peak[0] = used
        if running:
            gateway, device = running
            scanner = gateway._central._active_scanner if gateway._central else None
            at_peak["children"] = len(gateway.children)
            at_peak["queue"] = gateway.queue.count
            at_peak["backlog"] = len(device.backlog)
            at_peak["pending_adverts"] = len(scanner._queue) if scanner else 0


sample()
HEAP_AFTER_IMPORTS = gc.mem_alloc()


class MeasuredClient(MQTTClient):
    """umqtt.simple's MQTTClient unchanged; the heap is sampled around publishes."""

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        sample()
        super().publish(topic, msg, retain, qos)
        sample()


def stopped() -> bool:
    try:
        os.stat(FOLDER + "/stop")
        return True
    except OSError:
        return False


def main() -> int:
    with open(sys.argv[1]) as f:
        settings = json.load(f)
    run_s = settings.get("run_s", 120)
    sample_ms = settings.get("sample_ms", 500)
    memory_errors = [0]

    def log(text: str) -> None:
        if "MemoryError" in text:
            memory_errors[0] += 1
        print(text)  # noqa: T201 - the test reads stdout

    gateway = fleetline_gateway.Gateway(log=log, **settings.get("gateway", {}))
    device = None
    started = time.ticks_ms()
    last = [started, started, None]  # last sample, last state line, the state shown

    def feed() -> None:
        now = time.ticks_ms()
        if time.ticks_diff(now, last[0]) >= sample_ms:
            last[0] = now
            sample()
        if time.ticks_diff(now, last[1]) >= 200:
            last[1] = now
            state = counters(gateway, device)
            text = json.dumps(state)
            if text != last[2]:
                last[2] = text
                print("state " + text)  # noqa: T201
            if stopped() or time.ticks_diff(now, started) > run_s * 1000:
                device.stop()

    device = fleetline_device.Device(
        settings["device_id"],
        settings["key"],
        settings["host"],
        settings["port"],
        mqtt_client=MeasuredClient,
        read_sensors=gateway.sensors(),
        interval_s=settings.get("interval_s", 1),
        auth=settings.get("auth", "key"),
        feed=feed,
        log=log,
        backoff_min_s=0.2,
        backoff_max_s=1,
    )
    running.extend((gateway, device))
    gateway.run(device)
    sample()
    result = counters(gateway, device)
    result.update(
        {
            "memory_errors": memory_errors[0],
            "heap_peak": peak[0],
            "at_peak": at_peak,
            "heap_before_imports": HEAP_BEFORE_IMPORTS,
            "heap_after_imports": HEAP_AFTER_IMPORTS,
            "fake_radio_module": FAKE_RADIO,
            "heap_total": gc.mem_alloc() + gc.mem_free(),
        }
    )
    print("result " + json.dumps(result))  # noqa: T201
    return 0


def counters(gateway: object, device: object) -> dict:
    online = 0
    for child in gateway.children.values():
        if child.online:
            online += 1
    return {
        "connected": device is not None and device.client is not None,
        "connects": device.connects if device is not None else 0,
        "children": len(gateway.children),
        "online": online,
        "adverts": gateway.adverts,
        "adverts_other": gateway.adverts_other,
        "adverts_malformed": gateway.adverts_malformed,
        "adverts_partial": gateway.adverts_partial,
        "adverts_dropped": gateway.adverts_dropped,
        "sensors_ignored": gateway.sensors_ignored,
        "queue": gateway.queue.count,
        "readings_queued": gateway.readings_queued,
        "readings_sent": gateway.readings_sent,
        "readings_dropped": gateway.readings_dropped,
        "messages_bad": gateway.messages_bad,
        "refusals": gateway.refusals,
        "scans": gateway.scans,
        "scan_errors": gateway.scan_errors,
        "errors": gateway.errors,
    }


sys.exit(main())
