# A stand-in of MicroPython's `esp32` module for the unix port (tests/firmware/test_image.py):
# two OTA partitions as files in FLEETLINE_FAKES, and the ESP32 bootloader's choice at
# each boot (this module is imported once per boot): a partition set to boot is booted,
# pending verification; booted again without having been marked valid, the bootloader
# goes back to the previous one, as ESP-IDF's app rollback does.
import json
import os

FOLDER = os.getenv("FLEETLINE_FAKES") or "."
BLOCK = 4096
SIZE = 64 * BLOCK
OTHER = {"ota_0": "ota_1", "ota_1": "ota_0"}


def _load():
    try:
        with open(FOLDER + "/otadata.json") as f:
            return json.load(f)
    except OSError:
        return {"running": "ota_0", "boot": "ota_0", "pending": None, "events": []}


def _save(state):
    with open(FOLDER + "/otadata.json", "w") as f:
        json.dump(state, f)


def _bootloader():
    state = _load()
    if state["pending"] == state["running"]:  # reset before it was marked valid
        state["events"].append("rollback " + state["running"])
        state["boot"] = state["running"] = OTHER[state["running"]]
        state["pending"] = None
    elif state["boot"] != state["running"]:
        state["running"] = state["boot"]
        state["pending"] = state["boot"]
        state["events"].append("boot " + state["boot"])
    _save(state)


_bootloader()


class Partition:
    BOOT = 0
    RUNNING = 1

    def __init__(self, id, block_size=BLOCK):
        state = _load()
        self.label = state["running"] if id == Partition.RUNNING else (
            state["boot"] if id == Partition.BOOT else id)

    def info(self):
        return (0, 16 + int(self.label[-1]), 0x10000, SIZE, self.label, False)

    def get_next_update(self):
        return Partition(OTHER[self.label])

    def _path(self):
        return FOLDER + "/" + self.label + ".bin"

    def writeblocks(self, n, buf):
        if len(buf) % BLOCK or (n + 1) * BLOCK > SIZE:
            raise OSError(22)
        try:
            f = open(self._path(), "r+b")
        except OSError:
            f = open(self._path(), "w+b")
        f.seek(n * BLOCK)
        f.write(buf)
        f.close()

    def readblocks(self, n, buf):
        with open(self._path(), "rb") as f:
            f.seek(n * BLOCK)
            got = f.readinto(buf)
        for i in range(got or 0, len(buf)):
            buf[i] = 0xFF

    def set_boot(self):
        state = _load()
        state["boot"] = self.label
        _save(state)

    @staticmethod
    def mark_app_valid_cancel_rollback():
        state = _load()
        state["pending"] = None
        state["events"].append("valid " + state["running"])
        _save(state)

    @staticmethod
    def mark_app_invalid_rollback_and_reboot():
        state = _load()
        state["events"].append("invalid " + state["running"])
        state["boot"] = OTHER[state["running"]]
        state["pending"] = None
        _save(state)
        raise SystemExit(0)
