# The ESP8266 board layer: about 40 KB of heap free, one ADC (A0, 0-1 V), no temperature
# sensor on the chip; Wi-Fi as on the ESP32. MicroPython only (machine, network).
import gc

import fleetline_board
import machine
import network
from fleetline_board import Feeder, Relay, credentials, log, show_message, sync_clock  # noqa: F401
from fleetline_board import connect_wlan as connect_network  # noqa: F401
from fleetline_board import wifi_client_factory as mqtt_client_factory  # noqa: F401

PLATFORM = "esp8266"
# Firmware updates and file uploads (fleetline_transfers): not on its 40 KiB heap
# unless the config says TRANSFERS = True.
TRANSFERS = False


def model():
    return fleetline_board.model("esp8266")


class Sensors:
    """Free memory, uptime, Wi-Fi signal; A0 (ADC_PIN = 0) and a DHT22 when configured."""

    def __init__(self, config):
        self.wlan = network.WLAN(network.STA_IF)
        self.adc = machine.ADC(0) if getattr(config, "ADC_PIN", None) is not None else None
        self.dht = fleetline_board.dht_reader(config)
        self.uptime = fleetline_board.Uptime()

    def read(self):
        values = {"uptime_s": self.uptime.seconds(), "mem_free": gc.mem_free()}
        try:
            values["rssi"] = self.wlan.status("rssi")
        except Exception:  # not connected
            pass
        if self.adc is not None:
            values["adc"] = self.adc.read()  # 0-1024 for 0-1 V
        if self.dht is not None:
            measured = self.dht()
            if measured is not None:
                values["temperature"], values["humidity"] = measured
        return values
