# Run by tests/firmware/test_image.py under the MicroPython unix port, once per "boot":
# fleetline_ota's image path (an update written into the next esp32 OTA partition) and
# the loader's trial and rollback, against the stand-in partitions of
# tests/firmware/partitions/esp32.py. The download itself is the bundle path's
# (tests/firmware/test_ota.py); here the image's bytes are fed as they would arrive.
import binascii
import hashlib
import json
import sys

import esp32  # the bootloader's choice for this boot
import fleetline_boot
import fleetline_ota

FOLDER = sys.argv[2]


class Device:
    """What the updater uses of fleetline_device.Device."""

    def __init__(self):
        self._desired = {}
        self.extensions = []
        self._base = "devices/d/"
        self._feed = None
        self._reboot_requested = False

    def _log(self, text):
        print(text)  # noqa: T201 - the test reads stdout

    def _publish(self, topic, text):
        with open(FOLDER + "/reports", "a") as f:
            f.write(json.dumps(json.loads(text)["firmware"]) + "\n")

    def http_authorization(self):
        return None


def image(name):
    with open(FOLDER + "/" + name, "rb") as f:
        return f.read()


def updater(version):
    fleetline_ota._load()
    return fleetline_ota.Updater(Device(), version, "esp32", "00", partitions=esp32)


def feed(up, data, start, end):
    up._buffers()
    up._received = up._staged_bytes()
    up._check = up._rehash()
    at = max(start, up._received)
    print("feeding from", at)  # noqa: T201 - the test reads stdout
    while at < end:
        chunk = data[at:min(end, at + 1000)]
        up._take(memoryview(chunk))
        at += len(chunk)


def staged_state(version, data):
    return {"rollout": 7, "id": 1, "phase": "downloading", "version": version,
            "kind": "image", "size": len(data),
            "sha256": binascii.hexlify(hashlib.sha256(data).digest()).decode()}


phase = sys.argv[1]
fleetline_boot.start(partitions=esp32)
if phase == "first-half":  # v1 runs; the update starts; a reset cuts it at 70 KB
    up = updater("1.0.0")
    up._set(staged_state("2.0.0", image("v2.bin")))
    feed(up, image("v2.bin"), 0, 70000)
elif phase == "second-half":  # v1 again: it goes on from what the partition holds
    up = updater("1.0.0")
    feed(up, image("v2.bin"), 0, len(image("v2.bin")))
    up._verify()
    print("reboot asked", up.device._reboot_requested)  # noqa: T201 - the test reads stdout
elif phase == "run":  # whatever the bootloader booted runs; `confirm`: it comes up
    up = updater(sys.argv[3])
    if sys.argv[4] == "confirm":
        up.step()
    print("phase", up.state.get("phase"))  # noqa: T201 - the test reads stdout
elif phase == "stage":  # a whole image at once
    up = updater(sys.argv[3])
    up._set(staged_state(sys.argv[4], image(sys.argv[5])))
    feed(up, image(sys.argv[5]), 0, len(image(sys.argv[5])))
    up._verify()
print("state", json.dumps(fleetline_boot.load() or {}))  # noqa: T201 - the test reads stdout
