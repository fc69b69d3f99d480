# The ESP32 board layer: its sensors (the chip's temperature, an ADC pin, a DHT22), the
# Wi-Fi; the rest is fleetline_board.py. MicroPython only (machine, network, esp32).
import gc

import fleetline_board
import machine
import network
from fleetline_board import Feeder, Relay, credentials, log, show_message, sync_clock  # noqa: F401
from fleetline_board import connect_wlan as connect_network  # noqa: F401
from fleetline_board import wifi_client_factory as mqtt_client_factory  # noqa: F401

PLATFORM = "esp32"
# Firmware updates and file uploads (fleetline_transfers): they fit its heap.
TRANSFERS = True


def model():
    return fleetline_board.model("esp32")


class Sensors:
    """What an ESP32 can tell without extra parts: chip temperature, free memory,
    uptime, Wi-Fi signal; an ADC pin and a DHT22 when configured."""

    def __init__(self, config):
        self.wlan = network.WLAN(network.STA_IF)
        self.adc = None
        pin = getattr(config, "ADC_PIN", None)
        if pin is not None:
            self.adc = machine.ADC(machine.Pin(pin))
            self.adc.atten(machine.ADC.ATTN_11DB)  # the full 0-3.3 V range
        self.dht = fleetline_board.dht_reader(config)
        self.uptime = fleetline_board.Uptime()

    def temperature_c(self):
        try:
            import esp32
        except ImportError:
            return None
        if hasattr(esp32, "mcu_temperature"):  # ESP32-S2/S3/C3: degrees Celsius
            return esp32.mcu_temperature()
        if hasattr(esp32, "raw_temperature"):  # the original ESP32: degrees Fahrenheit,
            # and only a rough figure (the sensor is uncalibrated, read near the CPU)
            return round((esp32.raw_temperature() - 32) / 1.8, 1)
        return None

    def read(self):
        values = {
            "uptime_s": self.uptime.seconds(),
            "mem_free": gc.mem_free(),
            "mcu_temp": self.temperature_c(),
        }
        try:
            values["rssi"] = self.wlan.status("rssi")
        except Exception:  # not connected
            pass
        if self.adc is not None:
            values["adc"] = self.adc.read_u16()
        if self.dht is not None:
            measured = self.dht()
            if measured is not None:
                values["temperature"], values["humidity"] = measured
        return values
