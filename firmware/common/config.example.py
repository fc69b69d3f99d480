# The board's settings: copy to config_local.py (gitignored: it holds the device key),
# fill it in, and copy it to the board with `mpremote cp config_local.py :config_local.py`.

WIFI_SSID = "my-network"
WIFI_PASSWORD = "my-wifi-password"

# What `fleetline device create esp32-01` printed (the key is shown once): either the
# connection string...
CONNECTION_STRING = ""
# ...or its parts (used when CONNECTION_STRING is empty).
DEVICE_ID = "esp32-01"
DEVICE_KEY = "base64 key from fleetline device create"
MQTT_HOST = "broker.example.org"
MQTT_PORT = 8883

# Or let the board register itself on first boot (no key above): the enrollment, its
# registration id and its own registration key (`fleetline firmware config --enrollment`
# derives it from the group key, which never goes on a board), and where the broker is.
# The answer is kept in PROVISIONED_FILE; delete it to register again.
ENROLLMENT = ""
REGISTRATION_ID = ""
REGISTRATION_KEY = ""
PROVISIONING_HOST = "broker.example.org"
PROVISIONING_PORT = 8883
# An X.509 identity instead of a key: the client certificate and its private key (PEM or
# DER) on the board.
CERT_FILE = ""
KEY_FILE = ""

# TLS: the CA certificate that signed the broker's (PEM or DER), copied to the board
# (`fleetline up` prints where its CA file is). The broker's certificate must name
# MQTT_HOST. Empty: plain MQTT on port 1883, the key or token in clear: only on a network
# you trust.
CA_FILE = "ca.crt"
# A read or write on the broker connection gives up after this many seconds (a silent
# link): the device reconnects, taking readings into its backlog meanwhile.
SOCKET_TIMEOUT_S = 10

# "token": log in with a SAS token signed on the board (needs the clock, set over NTP);
# "key": with the key itself.
AUTH = "token"
TOKEN_TTL_S = 3600
NTP_HOST = "pool.ntp.org"

# Seconds between readings, until the desired twin's interval_s says otherwise.
INTERVAL_S = 10

# Optional hardware (None: absent).
ADC_PIN = None  # e.g. 34: its raw reading (read_u16, 0-65535) as the metric "adc"
RELAY_PIN = None  # e.g. 2: method `switch` {"on": true} and desired relay_on drive it
RELAY_ACTIVE_HIGH = True
# The units the device reports for its metrics (the dashboard shows them on the charts):
# the board's own (uptime_s s, mem_free B, mcu_temp and temperature °C, humidity %, rssi
# dBm) and these over them; None drops one. E.g. {"adc": "mV"}.
UNITS = {}

# The hardware watchdog resets the board when the loop stalls this long (the loop feeds
# it, also while it waits on the network). 0: off.
WATCHDOG_S = 120

# Firmware updates (docs/ota.md): the release key's public half, hex
# (`fleetline firmware keygen` printed it; GET /v1/release-key gives it). Empty: the board
# takes no updates. TARGET: the releases it takes (default: the board's, e.g. "esp32").
RELEASE_KEY = ""
# TARGET = "esp32"
# Firmware updates and file uploads (the method `upload`, files of files/) at all; the
# board layer's default (off on the ESP8266, whose heap they do not fit).
# TRANSFERS = True
# After an error that stops the application (a module of a broken update that does not
# load), the board resets after this many seconds; each such boot counts towards the
# rollback of an update on trial.
CRASH_RESET_S = 10

# A BLE gateway (firmware/README.md, "Gateway"): the BTHome v2 sensors the board hears
# become its children (register it with `fleetline device create ID --gateway
# --create-children --child-pattern 'ble-[0-9a-f]{12}'`). Needs aioble on the board
# (`mpremote mip install aioble-central`).
GATEWAY = False
# GATEWAY_MAX_CHILDREN = 32
# GATEWAY_OFFLINE_AFTER_S = 60
# GATEWAY_QUEUE_READINGS = 100
# GATEWAY_CHILD_INTERVAL_S = 10
