# A fake of MicroPython's `machine` for the ESP32 application on the unix port (run by
# tests/firmware/test_board.py): the unix port has no pins, ADC or watchdog. What the
# test controls or observes goes through files in the folder FLEETLINE_FAKES names.
import os
import sys
import time

FOLDER = os.getenv("FLEETLINE_FAKES") or "."


def _note(name, text):
    with open(FOLDER + "/" + name, "a") as f:
        f.write(text + "\n")


def reset():
    """A board restarts; here the process ends (the test may start it again)."""
    _note("events", "reset")
    sys.exit(0)


class WDT:
    """A watchdog that would have reset the board: a gap between feeds longer than its
    timeout is written down and ends the process with 3."""

    def __init__(self, timeout=5000):
        self.timeout = timeout
        self.last = time.ticks_ms()
        self.longest = 0

    def feed(self):
        now = time.ticks_ms()
        gap = time.ticks_diff(now, self.last)
        self.last = now
        if gap > self.longest:
            self.longest = gap
            with open(FOLDER + "/wdt_longest_ms", "w") as f:
                f.write(str(gap))
        if gap > self.timeout:
            _note("events", "watchdog " + str(gap))
            sys.exit(3)


class Pin:
    OUT = 1
    IN = 0

    def __init__(self, pin, mode=None, value=None):
        self.pin = pin
        self._value = value or 0

    def value(self, v=None):
        if v is None:
            return self._value
        self._value = v
        _note("pins", str(self.pin) + "=" + str(v))


class ADC:
    ATTN_11DB = 3

    def __init__(self, pin):
        self.pin = pin

    def atten(self, value):
        pass

    def read_u16(self):
        try:
            with open(FOLDER + "/adc") as f:
                return int(f.read())
        except OSError:
            return 0

    def read(self):  # the ESP8266's A0: 0-1024
        return min(1024, self.read_u16())

