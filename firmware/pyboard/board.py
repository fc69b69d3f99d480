# The Pyboard board layer (STM32, the `pyb` module): wired Ethernet through a WIZnet5x00
# module on SPI (the Pyboard has no Wi-Fi), the chip's temperature through the ADC, an
# analog pin, the LEDs for status. MicroPython only (pyb, machine, network).
import gc
import time

import fleetline_board
import network
import pyb
from fleetline_board import Feeder, Relay, credentials, log, show_message, sync_clock  # noqa: F401

PLATFORM = "pyboard"
# Firmware updates and file uploads (fleetline_transfers): they fit its heap.
TRANSFERS = True
NETWORK_TIMEOUT_MS = 20000
_nic = []


def connect_network(config, wait_ms=NETWORK_TIMEOUT_MS):
    """The WIZnet5x00 Ethernet module (WIZNET_SPI, WIZNET_CS, WIZNET_RST; the defaults
    are the Pyboard's X position); address by DHCP."""
    if not _nic:
        _nic.append(
            network.WIZNET5K(
                pyb.SPI(getattr(config, "WIZNET_SPI", 1)),
                pyb.Pin(getattr(config, "WIZNET_CS", "X5")),
                pyb.Pin(getattr(config, "WIZNET_RST", "X4")),
            )
        )
    nic = _nic[0]
    start = time.ticks_ms()
    while not nic.isconnected():
        if time.ticks_diff(time.ticks_ms(), start) >= wait_ms:
            raise OSError("Ethernet: no link or no DHCP answer")
        time.sleep_ms(200)
    return nic


def mqtt_client_factory(mqtt_class, config):
    return fleetline_board.mqtt_client_factory(mqtt_class, config, connect_network)


def model():
    return fleetline_board.model("pyboard")


class Sensors:
    """The chip's temperature, free memory, uptime; an analog pin (ADC_PIN, e.g. "X19")
    when configured. The green LED blinks at every reading."""

    def __init__(self, config):
        self.chip = pyb.ADCAll(12, 0x70000)  # the internal channels only
        pin = getattr(config, "ADC_PIN", None)
        self.adc = pyb.ADC(pyb.Pin(pin)) if pin is not None else None
        self.led = pyb.LED(2)
        self.uptime = fleetline_board.Uptime()

    def read(self):
        self.led.toggle()
        values = {
            "uptime_s": self.uptime.seconds(),
            "mem_free": gc.mem_free(),
            "mcu_temp": round(self.chip.read_core_temp(), 1),
        }
        if self.adc is not None:
            values["adc"] = self.adc.read()  # 0-4095 for 0-3.3 V
        return values
