# What every MicroPython board layer shares (esp32/, esp8266/ and pyboard/board.py build on
# it): the console log, the settings, the MQTT client with TLS and bounded waits, the
# Wi-Fi join, the clock, a relay and the watchdog. MicroPython only.
import gc
import json
import time

import fleetline_device
import fleetline_umqtt
import machine

WIFI_TIMEOUT_MS = 20000
# A read or write on the broker connection gives up after this long (fleetline_umqtt).
SOCKET_TIMEOUT_S = 10
GC_EVERY_MS = 5000


# The units of what the board layers read (docs/protocol.md, the twin's `units`); a
# config's UNITS adds its own or replaces these (None: no unit for that metric).
UNITS = {"uptime_s": "s", "mem_free": "B", "mcu_temp": "°C", "rssi": "dBm",
         "temperature": "°C", "humidity": "%"}


def units(config):
    """The units the device reports: UNITS with the config's UNITS over them."""
    out = dict(UNITS)
    for name, unit in getattr(config, "UNITS", {}).items():
        if unit is None:
            out.pop(name, None)
        else:
            out[name] = unit
    return out


def log(text):
    print(text)  # noqa: T201 - the serial console is the board's log


def show_message(body, properties):
    """A cloud-to-device message, as the reference firmware takes it: printed, then
    completed. Return False (or raise) to reject one."""
    log("c2d: " + json.dumps({"body": body, "properties": properties}))


def ca_file(config):
    """The CA certificate file the broker is verified against; empty: plain MQTT."""
    return getattr(config, "CA_FILE", "")


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def credentials(config, make_client=None, feed=None):
    """(device id, key, host, port, auth) from CONNECTION_STRING, the separate settings,
    or, with ENROLLMENT, what self-provisioning gave (asked on first boot, then kept in
    flash: fleetline_provision, as REGISTRATION_ID with REGISTRATION_KEY or a certificate).
    ``auth``: "token" or "key" (AUTH), or "x509" when the device has a certificate
    (CERT_FILE)."""
    default_port = 8883 if ca_file(config) else 1883
    auth = "x509" if getattr(config, "CERT_FILE", "") else getattr(config, "AUTH", "token")
    enrollment = getattr(config, "ENROLLMENT", "")
    if enrollment:
        import fleetline_provision

        info = fleetline_provision.Provisioning(
            enrollment,
            config.REGISTRATION_ID,
            getattr(config, "PROVISIONING_HOST", "") or config.MQTT_HOST,
            getattr(config, "PROVISIONING_PORT", default_port),
            make_client,
            key=getattr(config, "REGISTRATION_KEY", ""),
            auth="key" if auth == "key" else "token",
            sync_clock=lambda: sync_clock(config),
            feed=feed,
            log=log,
        ).run(getattr(config, "PROVISIONED_FILE", fleetline_provision.PROVISIONED_FILE))
        if info["auth"] != "key":
            auth = "x509"
        return info["device_id"], info["key"], info["host"], info["port"], auth
    text = getattr(config, "CONNECTION_STRING", "")
    if text:
        parts = fleetline_device.parse_connection_string(text)
        return (
            parts["DeviceId"],
            parts["SharedAccessKey"],
            parts["HostName"],
            int(parts.get("Port") or default_port),
            auth,
        )
    port = getattr(config, "MQTT_PORT", default_port)
    return config.DEVICE_ID, getattr(config, "DEVICE_KEY", ""), config.MQTT_HOST, port, auth


def connect_wlan(config, wait_ms=WIFI_TIMEOUT_MS):
    """Join the Wi-Fi, waiting up to ``wait_ms`` (boot.py); with 0, only start joining and
    say whether it is up: the device core then waits between attempts, taking readings
    and feeding the watchdog, instead of blocking here."""
    import network

    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if wlan.isconnected():
        return wlan
    # A join in progress is left to finish (connecting again would restart it).
    if wlan.status() != getattr(network, "STAT_CONNECTING", -1):
        try:
            wlan.connect(config.WIFI_SSID, config.WIFI_PASSWORD)
        except OSError as exc:
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


def mqtt_client_factory(mqtt_class, config, join_network):
    """umqtt.simple's MQTTClient with bounded waits and, with CA_FILE, TLS verified
    against that CA (fleetline_umqtt), made only once ``join_network(config, wait_ms=0)``
    says the network is up (the core calls this before every connection attempt)."""
    timeout_s = getattr(config, "SOCKET_TIMEOUT_S", SOCKET_TIMEOUT_S)
    path = ca_file(config)
    made = []  # the client class, once made: its TLS context is made at the first attempt

    def make(client_id, server, port, user, password, keepalive):
        join_network(config, wait_ms=0)
        if not made:
            # Here, not at start: a failure (no CA file, no memory) is a failed attempt,
            # retried with backoff, not a firmware that stops.
            tls = None
            if path:
                cert = getattr(config, "CERT_FILE", "")
                tls = fleetline_umqtt.tls_context(
                    read_file(path),
                    read_file(cert) if cert else b"",
                    read_file(config.KEY_FILE) if cert else b"",
                )
            made.append(fleetline_umqtt.client_class(mqtt_class, timeout_s, tls))
        return made[0](client_id, server, port, user, password, keepalive)

    return make


def wifi_client_factory(mqtt_class, config):
    """mqtt_client_factory for a board on Wi-Fi (the ESP32s, the ESP8266)."""
    return mqtt_client_factory(mqtt_class, config, connect_wlan)


def model(default):
    import sys

    return sys.implementation._machine if hasattr(sys.implementation, "_machine") else default


def dht_reader(config):
    """A DHT22 (or DHT11) on DHT_PIN, when configured: a function returning (temperature
    in degrees Celsius, relative humidity in %), or None."""
    pin = getattr(config, "DHT_PIN", None)
    if pin is None:
        return None
    import dht

    kind = dht.DHT11 if getattr(config, "DHT_MODEL", "DHT22") == "DHT11" else dht.DHT22
    sensor = kind(machine.Pin(pin))

    def read():
        try:
            sensor.measure()  # at most once every 2 s; OSError on a bad read
        except OSError as exc:
            log("dht: " + repr(exc))
            return None
        return sensor.temperature(), sensor.humidity()

    return read


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


class Uptime:
    """Milliseconds since start, through ticks wrapping around."""

    def __init__(self):
        self.ms = 0
        self.last = time.ticks_ms()

    def seconds(self):
        now = time.ticks_ms()
        self.ms += time.ticks_diff(now, self.last)
        self.last = now
        return self.ms // 1000
