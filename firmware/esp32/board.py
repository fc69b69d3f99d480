# The ESP32 side of the firmware: Wi-Fi, clock, sensors, relay, watchdog. MicroPython only
# (machine, network, esp32); the protocol is in fleetline_device.py.
import gc
import json
import sys
import time

import fleetline_device
import fleetline_umqtt
import machine
import network

WIFI_TIMEOUT_MS = 20000
# A read or write on the broker connection gives up after this long (fleetline_umqtt).
SOCKET_TIMEOUT_S = 10
GC_EVERY_MS = 5000


def log(text):
    print(text)  # noqa: T201 - the serial console is the board's log


def show_message(body, properties):
    """A cloud-to-device message, as the reference firmware takes it: printed, then
    completed. Return False (or raise) to reject one."""
    log("c2d: " + json.dumps({"body": body, "properties": properties}))


def ca_file(config):
    """The CA certificate file the broker is verified against; empty: plain MQTT."""
    return getattr(config, "CA_FILE", "")


def credentials(config):
    """(device id, key, host, port) from CONNECTION_STRING or the separate settings."""
    default_port = 8883 if ca_file(config) else 1883
    text = getattr(config, "CONNECTION_STRING", "")
    if text:
        parts = fleetline_device.parse_connection_string(text)
        return (
            parts["DeviceId"],
            parts["SharedAccessKey"],
            parts["HostName"],
            int(parts.get("Port") or default_port),
        )
    port = getattr(config, "MQTT_PORT", default_port)
    return config.DEVICE_ID, config.DEVICE_KEY, config.MQTT_HOST, port


def connect_wifi(config, wait_ms=WIFI_TIMEOUT_MS):
    """Join the Wi-Fi, waiting up to ``wait_ms`` (boot.py); with 0, only start joining and
    say whether it is up: the device core then waits between attempts, taking readings
    and feeding the watchdog, instead of blocking here."""
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if wlan.isconnected():
        return wlan
    try:
        wlan.connect(config.WIFI_SSID, config.WIFI_PASSWORD)
    except OSError as exc:  # already joining
        log("wifi: " + repr(exc))
    start = time.ticks_ms()
    while not wlan.isconnected():
        if time.ticks_diff(time.ticks_ms(), start) >= wait_ms:
            raise OSError("Wi-Fi: no connection to " + config.WIFI_SSID)
        time.sleep_ms(200)
    log("wifi: " + wlan.ifconfig()[0])
    return wlan


def sync_clock(config):
    import ntptime

    ntptime.host = getattr(config, "NTP_HOST", "pool.ntp.org")
    ntptime.settime()  # UTC; raises OSError when the server does not answer
    log("clock: " + str(fleetline_device.epoch_s()))


def mqtt_client_factory(mqtt_class, config):
    """umqtt.simple's MQTTClient with bounded waits and, with CA_FILE, TLS verified
    against that CA (fleetline_umqtt), made only once the Wi-Fi is up again (the core
    calls this before every connection attempt)."""
    tls = None
    path = ca_file(config)
    if path:
        with open(path, "rb") as f:
            tls = fleetline_umqtt.tls_context(f.read())
    client_class = fleetline_umqtt.client_class(
        mqtt_class, getattr(config, "SOCKET_TIMEOUT_S", SOCKET_TIMEOUT_S), tls
    )

    def make(client_id, server, port, user, password, keepalive):
        connect_wifi(config, wait_ms=0)
        return client_class(client_id, server, port, user, password, keepalive)

    return make


def model():
    return sys.implementation._machine if hasattr(sys.implementation, "_machine") else "esp32"


class Sensors:
    """What an ESP32 can tell without extra parts: chip temperature, free memory,
    uptime, Wi-Fi signal; an ADC pin when configured."""

    def __init__(self, config):
        self.wlan = network.WLAN(network.STA_IF)
        self.adc = None
        pin = getattr(config, "ADC_PIN", None)
        if pin is not None:
            self.adc = machine.ADC(machine.Pin(pin))
            self.adc.atten(machine.ADC.ATTN_11DB)  # the full 0-3.3 V range
        self.uptime_ms = 0
        self.last_tick = time.ticks_ms()

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
        now = time.ticks_ms()
        self.uptime_ms += time.ticks_diff(now, self.last_tick)  # ticks wrap; this does not
        self.last_tick = now
        values = {
            "uptime_s": self.uptime_ms // 1000,
            "mem_free": gc.mem_free(),
            "mcu_temp": self.temperature_c(),
        }
        try:
            values["rssi"] = self.wlan.status("rssi")
        except Exception:  # not connected
            pass
        if self.adc is not None:
            values["adc"] = self.adc.read_u16()
        return values


class Relay:
    def __init__(self, pin, active_high=True):
        self.active_high = active_high
        self.pin = machine.Pin(pin, machine.Pin.OUT, value=0 if active_high else 1)

    def set(self, on):
        self.pin.value(1 if on == self.active_high else 0)

    def is_on(self):
        return bool(self.pin.value()) == self.active_high


class Feeder:
    """Called on every loop: feeds the watchdog, collects garbage now and then."""

    def __init__(self, wdt):
        self.wdt = wdt
        self.last_gc = time.ticks_ms()

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()
        if time.ticks_diff(time.ticks_ms(), self.last_gc) > GC_EVERY_MS:
            gc.collect()
            self.last_gc = time.ticks_ms()
