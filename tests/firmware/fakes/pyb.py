# A fake of the Pyboard's `pyb` (tests/firmware/test_board.py): the unix port has no STM32.
import os

FOLDER = os.getenv("FLEETLINE_FAKES") or "."


class Pin:
    def __init__(self, name, *args, **kwargs):
        self.name = name


class SPI:
    def __init__(self, bus):
        self.bus = bus


class LED:
    def __init__(self, n):
        self.n = n
        self.on = False

    def toggle(self):
        self.on = not self.on


class ADC:
    def __init__(self, pin):
        self.pin = pin

    def read(self):
        try:
            with open(FOLDER + "/adc") as f:
                return int(f.read())
        except OSError:
            return 0


class ADCAll:
    def __init__(self, resolution, mask=0):
        self.resolution = resolution

    def read_core_temp(self):
        return 36.6
