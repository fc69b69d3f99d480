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
MQTT_PORT = 1883

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

# The hardware watchdog resets the board when the loop stalls this long (a blocking
# socket call on a half-open connection, which umqtt.simple cannot time out). 0: off.
WATCHDOG_S = 120
