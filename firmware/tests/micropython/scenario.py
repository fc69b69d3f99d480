# Runs under MicroPython (run.mjs): the device core's arithmetic on the vectors in
# /input.json, and one session over an in-memory stand-in for umqtt.simple's client (no
# sockets in the WebAssembly port), recording every call. tests/e2e/test_firmware.py checks
# the output against CPython's hmac and fleetline.devicekeys, and the protocol's order;
# the same core against the real broker is tested there under CPython.
import binascii
import json
import sys

import fleetline_device as fd

inp = json.load(open("/input.json"))
out = {"implementation": sys.implementation.name}

out["hmac"] = [
    fd.b64encode(fd.hmac_sha256(binascii.a2b_base64(k.encode()), binascii.a2b_base64(m.encode())))
    for k, m in inp["hmac"]
]
out["tokens"] = [fd.sas_token(key, device_id, expiry) for key, device_id, expiry in inp["tokens"]]
out["connection_string"] = fd.parse_connection_string(inp["connection_string"])
out["clock_valid"] = fd.clock_valid()

calls = []
incoming = []


def text(value):
    return value.decode() if isinstance(value, (bytes, bytearray)) else value


class Client:
    """umqtt.simple's API, in memory: records calls, delivers queued messages."""

    def __init__(self, client_id, server, port, user, password, keepalive):
        calls.append(["new", client_id, server, port, user, password, keepalive])
        self.cb = None

    def set_callback(self, cb):
        self.cb = cb

    def set_last_will(self, topic, msg, retain=False, qos=0):
        calls.append(["will", text(topic), text(msg), retain, qos])

    def connect(self, clean_session=True):
        calls.append(["connect", clean_session])
        return 0

    def subscribe(self, topic, qos=0):
        calls.append(["subscribe", text(topic), qos])

    def publish(self, topic, msg, retain=False, qos=0):
        calls.append(["publish", text(topic), text(msg), retain, qos])

    def check_msg(self):
        if not incoming:
            return None
        topic, msg = incoming.pop(0)
        self.cb(topic.encode(), msg.encode())
        return 0x30

    def ping(self):
        calls.append(["ping"])

    def disconnect(self):
        calls.append(["disconnect"])

    def close(self):
        calls.append(["close"])


acted = []
counter = [0]


def read_sensors():
    counter[0] += 1
    return {"n": counter[0], "absent": None}


def on_c2d(body, properties):
    acted.append([body, properties])
    return body != "refuse"


device = fd.Device(
    inp["device_id"],
    inp["key"],
    "broker.local",
    1883,
    mqtt_client=Client,
    read_sensors=read_sensors,
    interval_s=3600,
    backlog_readings=5,
    backoff_min_s=0.01,
    methods={"add": lambda params: params["a"] + params["b"]},
    on_c2d=on_c2d,
    reported={"fw": fd.VERSION},
    log=lambda line: None,
)
relay = [False]


def set_relay(on):
    relay[0] = on


fd.add_switch(device, set_relay, lambda: relay[0])


def mark(name):
    calls.append(["--", name])


base = "devices/" + inp["device_id"] + "/"
mark("connect")
out["connected"] = device._try_connect()
mark("first step")
device.step()  # the first reading is due at once; the startup report goes out
mark("desired v2")
incoming.append((base + "twin/desired", json.dumps({"version": 2, "desired": {"interval_s": 5}})))
device.step()
mark("desired v1 (stale)")
incoming.append((base + "twin/desired", json.dumps({"version": 1, "desired": {"interval_s": 9}})))
device.step()
mark("desired v3")
incoming.append((base + "twin/desired", json.dumps({"version": 3, "desired": {"relay_on": True}})))
device.step()
mark("methods")
requests = [
    {"method": "ping", "params": {"x": 1}},
    {"method": "add", "params": {"a": 2, "b": 3}},
    {"method": "nope"},
    {"method": "reboot"},
    {"method": "switch", "params": {"on": 1}},
    {"method": "switch", "params": {"on": True}},
]
for i, request in enumerate(requests):
    incoming.append((base + "methods/r" + str(i + 1) + "/req", json.dumps(request)))
incoming.append((base + "methods/r7/req", "not json"))
device.step()
mark("c2d")
incoming.append((base + "c2d", json.dumps({"id": "m1", "body": {"cmd": "open"}, "properties": {}})))
incoming.append((base + "c2d", json.dumps({"id": "m1", "body": {"cmd": "open"}, "properties": {}})))
incoming.append((base + "c2d", json.dumps({"id": "m2", "body": "refuse"})))
device.step()
mark("offline readings")
device._drop(OSError("gone"))
for _ in range(8):
    device.take_reading()
out["backlog_offline"] = len(device.backlog)
mark("reconnect")
device._try_connect()
device.step()
mark("stop")
device.stop()
device.run()  # returns at once: says offline and disconnects

out["calls"] = calls
out["acted"] = acted
out["interval_s"] = device.interval_s
out["desired_version"] = device.desired_version
out["relay"] = relay[0]
out["counters"] = {
    "connects": device.connects,
    "readings_taken": device.readings_taken,
    "readings_sent": device.readings_sent,
    "readings_dropped": device.readings_dropped,
    "c2d_acted": device.c2d_acted,
}
print("RESULT " + json.dumps(out))  # noqa: T201 - run.mjs passes it on
