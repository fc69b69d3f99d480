"""fleetline's device side: the device contract of docs/protocol.md, portable.

One module for every device fleetline ships code for: the ESP32 firmware runs it under
MicroPython, the Raspberry Pi agent and the tests under CPython. So it imports only what
MicroPython has (binascii, gc, hashlib, json, random, time), uses no f-strings, `typing`,
dataclasses or `from __future__` (MicroPython has no such module), keeps every buffer
bounded, and talks to an MQTT client with umqtt.simple's API:
``MQTTClient(client_id, server, port, user, password, keepalive)``, ``set_last_will``,
``set_callback``, ``connect(clean_session)``, ``subscribe``, ``publish(topic, msg,
retain, qos)``, ``check_msg``, ``ping`` and ``disconnect``. On a board that is
micropython-lib's umqtt.simple; on a Pi ``umqtt_paho.MQTTClient`` (paho-mqtt).

What a :class:`Device` does, in its one thread:
- logs in with client id = user name = its id and a SAS token signed with its key (or the
  key itself), with a retained ``offline`` Last Will on ``devices/{id}/status``;
- subscribes to ``c2d``, ``twin/desired`` and ``methods/+/req`` *before* publishing a
  retained ``online`` (the API sends queued messages the moment it sees that);
- takes a reading every ``interval_s`` (``{"ts": epoch ms, "values": {...}}``); readings
  that could not be sent wait in a bounded backlog (also in a file with
  ``backlog_file``, so a reset keeps them) and go out as JSON arrays once
  connected again, each array built in one buffer of its size (no joined copies), fewer
  readings at a time after a MemoryError; a MemoryError is not a broken connection: the
  connection and the readings are kept;
- applies the desired twin (ignoring versions below one it applied) and reports what it
  applied as a merge patch; answers direct methods; acknowledges cloud-to-device messages,
  acting once on each id however often it is delivered;
- reconnects with capped, jittered backoff, and reconnects with a fresh token before the
  one it logged in with expires.

The umqtt callback only queues what arrives (a bounded inbox); messages are handled
between network calls, because umqtt.simple delivers messages while it waits for a
PUBACK or SUBACK and is not re-entrant.
"""

import binascii
import gc
import hashlib
import json
import random
import time

VERSION = "1.0.0"

TOKEN_TTL_S = 3600
# A token is renewed (by reconnecting) this long before it expires, or at 3/4 of a
# shorter lifetime.
TOKEN_RENEW_BEFORE_S = 300
KEEPALIVE_S = 60
# Readings kept while they cannot be sent; the oldest are dropped first. Each is kept as
# its JSON text in bytes (~45-120), so the default costs about 10 KB of RAM at most.
BACKLOG_READINGS = 100
# Readings per telemetry message when a backlog is sent (ingest takes up to 1000); halved
# after each MemoryError while the backlog is sent, back to this once it is all out.
BATCH_READINGS = 25
# Cloud-to-device message ids remembered with their outcome, to act once on each.
SEEN_C2D_IDS = 32
# Messages queued between two network calls; beyond, they are dropped (and counted).
INBOX_MESSAGES = 16
# Larger incoming messages are not parsed: a method gets 413; a c2d message cannot be
# acknowledged, so the API sends it again until it expires.
MAX_MESSAGE_BYTES = 16384
# What a desired `interval_s` may set (seconds between readings).
MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 86400
BACKOFF_MIN_S = 1
BACKOFF_MAX_S = 60
# After the broker refused the credentials (CONNACK 4 or 5): a key may be restored, so
# the device keeps trying, slowly.
BACKOFF_REFUSED_S = 300
LOOP_SLEEP_MS = 50
# A clock before this (2024-01-01) has not been set: no ts, no token.
CLOCK_VALID_AFTER_S = 1704067200

# What a desired-property handler returns to report nothing itself (it reports on its own).
NOT_REPORTED = object()

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

# MicroPython ports whose epoch is 2000-01-01 (ESP32 before 1.22, for one) count from
# there; the contract's ts and a token's expiry count from 1970.
_EPOCH_OFFSET_S = 946684800 if time.gmtime(0)[0] == 2000 else 0


def _print(text: str) -> None:
    print(text)  # noqa: T201 - the serial console (or journald) is a device's log


# MicroPython's ticks wrap around: add and compare them only with ticks_add/ticks_diff.
if hasattr(time, "ticks_ms"):
    _ticks_ms = time.ticks_ms
    _ticks_add = time.ticks_add
    _ticks_diff = time.ticks_diff
else:

    def _ticks_ms() -> int:
        return int(time.monotonic() * 1000)

    def _ticks_add(a: int, b: int) -> int:
        return a + b

    def _ticks_diff(a: int, b: int) -> int:
        return a - b


def _sleep_ms(ms: int) -> None:
    if hasattr(time, "sleep_ms"):
        time.sleep_ms(ms)
    else:
        time.sleep(ms / 1000)


def epoch_s() -> int:
    """Seconds since 1970-01-01 UTC, whatever the port's epoch."""
    return int(time.time()) + _EPOCH_OFFSET_S


def epoch_ms() -> int:
    if hasattr(time, "time_ns"):
        return time.time_ns() // 1000000 + _EPOCH_OFFSET_S * 1000
    return int(time.time() * 1000) + _EPOCH_OFFSET_S * 1000


def clock_valid() -> bool:
    return epoch_s() > CLOCK_VALID_AFTER_S


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104, block size 64): MicroPython has no hmac module."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    inner_pad = bytearray(64)
    outer_pad = bytearray(64)
    for i in range(64):
        k = key[i] if i < len(key) else 0
        inner_pad[i] = k ^ 0x36
        outer_pad[i] = k ^ 0x5C
    inner = hashlib.sha256(inner_pad)
    inner.update(msg)
    outer = hashlib.sha256(outer_pad)
    outer.update(inner.digest())
    return outer.digest()


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data).decode().strip()


def sas_token(key: str, device_id: str, expiry: int) -> str:
    """``sig=<base64 hmac-sha256(key bytes, "{device_id}\\n{expiry}")>&se=<expiry>``, as
    fleetline/devicekeys.py signs and the broker's auth plugin checks."""
    # Bytes in: some ports' binascii (a Python one in micropython-lib) takes no str.
    mac = hmac_sha256(binascii.a2b_base64(key.encode()), (device_id + "\n" + str(expiry)).encode())
    return "sig=" + b64encode(mac) + "&se=" + str(expiry)


def parse_connection_string(text: str) -> dict:
    """``HostName=...;Port=...;DeviceId=...;SharedAccessKey=...`` (what `fleetline device
    create` prints) as a dict of those names. A key's base64 may end in '=': only the
    first '=' of each part separates."""
    out = {}
    for part in text.strip().split(";"):
        at = part.find("=")
        if at > 0:
            out[part[:at].strip()] = part[at + 1 :].strip()
    for name in ("HostName", "DeviceId", "SharedAccessKey"):
        if not out.get(name):
            raise ValueError("connection string lacks " + name)
    return out


def _refused(exc: BaseException) -> bool:
    """CONNACK 4 (bad user name or password) or 5 (not authorized), as umqtt.simple's
    MQTTException carries them."""
    return type(exc).__name__ == "MQTTException" and bool(exc.args) and exc.args[0] in (4, 5)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Device:
    """One device: its connection, its cloud-facing state and its main loop (:meth:`run`).

    ``mqtt_client``: a class with umqtt.simple's constructor and methods.
    ``read_sensors()``: the values of one reading (``{"name": number|bool|str}``); a value
    of None is left out. ``methods``: name → ``fn(params)`` returning the payload, or
    ``(status, payload)``; raising ValueError answers 400, anything else 500.
    ``desired``: property name → ``fn(value)`` applying a desired value (None when the
    desired document lacks it) and returning the value to report (NOT_REPORTED: none).
    ``on_c2d(body, properties)``: acts on a message; returning False or raising rejects it.
    ``reboot()``: called after ``reboot`` was answered (machine.reset on a board); without
    it the method answers 501. ``sync_clock()``: sets the clock when it is not (NTP).
    ``feed()``: called every loop (a watchdog). ``reported``: reported once after the first
    connection (firmware version, model)."""

    def __init__(
        self,
        device_id: str,
        key: str,
        host: str,
        port: int = 1883,
        *,
        mqtt_client: object,
        read_sensors: object = None,
        interval_s: float = 10,
        auth: str = "token",
        token_ttl_s: int = TOKEN_TTL_S,
        keepalive_s: int = KEEPALIVE_S,
        backlog_readings: int = BACKLOG_READINGS,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        methods: dict | None = None,
        desired: dict | None = None,
        on_c2d: object = None,
        reboot: object = None,
        sync_clock: object = None,
        feed: object = None,
        reported: dict | None = None,
        log: object = None,
        backlog_file: str | None = None,
    ) -> None:
        if auth not in ("token", "key", "x509"):
            raise ValueError("auth is 'token', 'key' or 'x509'")
        self.device_id = device_id
        self.key = key
        self.host = host
        self.port = port
        self.auth = auth
        self.token_ttl_s = token_ttl_s
        self.keepalive_s = keepalive_s
        self.backlog_readings = backlog_readings
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.default_interval_s = interval_s
        self.interval_s = interval_s
        self._mqtt_client = mqtt_client
        self._read_sensors = read_sensors
        self._methods = methods or {}
        self._desired = {"interval_s": self._apply_interval}
        self._desired.update(desired or {})
        self._on_c2d_fn = on_c2d
        self._reboot_fn = reboot
        self._sync_clock = sync_clock
        self._feed = feed
        self._log = log or _print
        self._base = "devices/" + device_id + "/"
        self._status_topic = (self._base + "status").encode()
        self._telemetry_topic = (self._base + "telemetry").encode()
        self.client = None
        # What runs beside the protocol over transfer URLs (fleetline_ota.Updater,
        # fleetline_upload.Uploader) or for other devices (fleetline_gateway.Gateway):
        # each has connected(), step() and on_transfer(msg), and ignores transfer answers
        # to requests not its own.
        self.extensions = []
        # fn(topic, msg) for messages on topics not the device's own (a gateway's, for
        # its children: docs/gateways.md); None: they are ignored.
        self.on_message = None
        self.stopping = False
        self.desired_version = -1
        self.backlog = []  # each reading's JSON text, as bytes
        self._in_flight = 0  # the first readings of the backlog, being published now
        self._batch_readings = BATCH_READINGS
        self._inbox = []
        self._seen_ids = []
        self._seen_outcomes = {}
        self._pending_report = dict(reported or {})
        self._reboot_requested = False
        self._token_expiry = 0
        self._attempt = 0
        self._pause_ms = 0  # a wait the loop owes after a failed token renewal
        self._next_reading = _ticks_ms()
        self._last_tx = _ticks_ms()
        # What happened, for a `status` screen and the tests.
        self.connects = 0
        self.readings_taken = 0
        self.readings_sent = 0
        self.readings_dropped = 0
        self.messages_dropped = 0
        self.memory_errors = 0
        self.c2d_acted = 0
        self.last_error = None
        self.backlog_write_errors = 0
        self._dropped_reported = (0, 0)
        self._desired_errors = []  # the names last reported in desired_errors
        # Readings taken offline, also in flash: a reset keeps them (see _save_backlog).
        self._backlog_file = backlog_file
        self._file_lines = 0
        if backlog_file:
            self._load_backlog()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Until :meth:`stop`: stay connected, take readings, serve the cloud."""
        while not self.stopping:
            self._wait_ms(self.run_once())
        self._goodbye()

    def run_once(self) -> int:
        """One pass of :meth:`run`: connect when not connected, then :meth:`step`.
        Returns the milliseconds to wait before the next pass (the backoff after a
        failure), during which :meth:`tick` is due: for an application that runs its own
        loop (fleetline_gateway's asyncio one) instead of :meth:`run`."""
        if self.client is None and not self._try_connect():
            return int(self._backoff_s() * 1000)
        try:
            self.step()
        except MemoryError as exc:  # the heap's fault, not the connection's: keep it
            self._short_of_memory(exc)
        except Exception as exc:  # the connection broke (OSError, MQTTException...)
            self._drop(exc)
            return int(self._backoff_s() * 1000)
        if self._pause_ms:
            pause, self._pause_ms = self._pause_ms, 0
            return pause
        return LOOP_SLEEP_MS

    def tick(self) -> None:
        """What is due while the loop waits: the watchdog fed and, offline, readings."""
        if self._feed is not None:
            self._feed()
        if self.client is None:
            self._sample_if_due()

    def stop(self) -> None:
        """Ask :meth:`run` to say ``offline``, disconnect and return (from any thread)."""
        self.stopping = True

    def step(self) -> None:
        """One pass while connected: read the socket, handle what came, send what is due."""
        client = self.client
        for _ in range(INBOX_MESSAGES):
            if client.check_msg() is None:
                break
        self._handle_inbox()
        for extension in self.extensions:
            extension.step()
        self._sample_if_due()
        if self._pending_report:
            self._publish(self._base + "twin/reported", json.dumps(self._pending_report))
            self._pending_report = {}
        self._send_backlog()
        self._handle_inbox()  # what arrived while waiting for PUBACKs
        if self._reboot_requested and self._reboot_fn is not None:
            self._log("fleetline: rebooting as asked")
            self._reboot_fn()
            self._reboot_requested = False
        if _ticks_diff(_ticks_ms(), self._last_tx) >= self.keepalive_s * 500:
            client.ping()
            self._last_tx = _ticks_ms()
        if self.auth == "token" and epoch_s() >= self._token_expiry - self._renew_before_s():
            self._log("fleetline: renewing the token")
            # A clean DISCONNECT: no Last Will, the status stays online while it
            # reconnects at once.
            self.client = None
            client.disconnect()
            if not self._try_connect():
                self._pause_ms = int(self._backoff_s() * 1000)

    def _while_waiting(self) -> None:
        """While the client waits on the network (a PUBACK on a slow or silent link): the
        watchdog is fed and readings go on into the backlog."""
        if self._feed is not None:
            self._feed()
        self._sample_if_due()

    def _wait(self, seconds: float) -> None:
        self._wait_ms(int(seconds * 1000))

    def _wait_ms(self, ms: int) -> None:
        """Sleep, still taking readings (into the backlog while offline)."""
        start = _ticks_ms()
        while not self.stopping:
            self.tick()
            left = ms - _ticks_diff(_ticks_ms(), start)
            if left <= 0:
                return
            _sleep_ms(min(left, LOOP_SLEEP_MS))

    # -- connection ----------------------------------------------------------------

    def _renew_before_s(self) -> int:
        return min(TOKEN_RENEW_BEFORE_S, self.token_ttl_s // 4)

    def _password(self) -> str:
        if self.auth == "x509":
            # The client certificate in the TLS context is the credential; umqtt.simple
            # sends a password with every user name.
            return ""
        if self.auth == "key":
            return self.key
        if not clock_valid() and self._sync_clock is not None:
            try:
                self._sync_clock()
            except Exception as exc:
                self._log("fleetline: clock not set: " + repr(exc))
        if not clock_valid():
            raise OSError("the clock is not set: a token cannot be made")
        self._token_expiry = epoch_s() + self.token_ttl_s
        return sas_token(self.key, self.device_id, self._token_expiry)

    def _try_connect(self) -> bool:
        client = None
        try:
            password = self._password()
            client = self._mqtt_client(
                self.device_id, self.host, self.port, self.device_id, password, self.keepalive_s
            )
            client.set_callback(self._on_message)
            # A client that bounds its waits (fleetline_umqtt) calls this while it waits.
            client.on_wait = self._while_waiting
            client.set_last_will(self._status_topic, STATUS_OFFLINE, retain=True, qos=1)
            client.connect(True)
            self.client = client
            kinds = ["c2d", "twin/desired", "methods/+/req"]
            if self.extensions:
                kinds.append("transfers/res")
            for kind in kinds:
                client.subscribe((self._base + kind).encode(), qos=1)
            # Only now: the API sends queued messages when it sees this.
            client.publish(self._status_topic, STATUS_ONLINE, retain=True, qos=1)
        except Exception as exc:
            self.client = None
            if client is not None:
                self._close(client)
            self.last_error = exc
            self._attempt += 1
            self._log("fleetline: cannot connect to " + self.host + ": " + repr(exc))
            return False
        self._last_tx = _ticks_ms()
        self._attempt = 0
        self.last_error = None
        self.connects += 1
        self._log("fleetline: connected as " + self.device_id)
        if (self.readings_dropped, self.backlog_write_errors) != self._dropped_reported:
            # Readings lost to a full backlog (oldest first), and failed writes of its
            # file, so far: in the twin.
            self.report({"backlog_dropped": self.readings_dropped,
                         "backlog_write_errors": self.backlog_write_errors})
            self._dropped_reported = (self.readings_dropped, self.backlog_write_errors)
        for extension in self.extensions:
            extension.connected()
        return True

    def http_authorization(self) -> str | None:
        """How the device proves itself over HTTPS (transfers): a SAS token naming it,
        or None for a device that logs in with a certificate."""
        if self.auth == "x509" or not clock_valid():
            return None
        token = sas_token(self.key, self.device_id, epoch_s() + TOKEN_TTL_S)
        return "SharedAccessSignature sr=" + self.device_id + "&" + token

    def _backoff_s(self) -> float:
        if self.last_error is not None and _refused(self.last_error):
            return BACKOFF_REFUSED_S
        delay = min(self.backoff_max_s, self.backoff_min_s * (2 ** min(self._attempt - 1, 10)))
        # 50-100 % of it, so a fleet does not come back in step after a broker restart.
        return delay * (128 + random.getrandbits(7)) / 255

    def _drop(self, exc: BaseException) -> None:
        """The connection broke: close the socket without DISCONNECT, so the broker
        publishes the Last Will."""
        self._log("fleetline: connection lost: " + repr(exc))
        client, self.client = self.client, None
        self.last_error = exc
        self._attempt = 1
        if client is not None:
            self._close(client)
        if self.backlog:
            self._save_backlog()  # what was not yet acknowledged, before waiting

    def _short_of_memory(self, exc: BaseException) -> None:
        """A MemoryError: the readings stay in the backlog and the connection stays up;
        the garbage is collected and the backlog goes out in smaller batches."""
        self.memory_errors += 1
        self._batch_readings = max(1, self._batch_readings // 2)
        gc.collect()
        try:
            self._log("fleetline: out of memory, batches of " + str(self._batch_readings)
                      + " readings now: " + repr(exc))
        except MemoryError:  # even the log line did not fit: it is counted
            pass

    def _close(self, client: object) -> None:
        try:
            close = getattr(client, "close", None)
            if close is not None:
                close()
            elif getattr(client, "sock", None) is not None:
                client.sock.close()
        except Exception:  # already closed
            pass

    def _goodbye(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            # A clean DISCONNECT does not fire the Will: say it ourselves.
            client.publish(self._status_topic, STATUS_OFFLINE, retain=True, qos=1)
            client.disconnect()
        except Exception as exc:
            self._log("fleetline: goodbye failed: " + repr(exc))
            self._close(client)

    def _publish(self, topic: str, text: str) -> None:
        self.publish(topic, text)

    def publish(self, topic: object, payload: object, retain: bool = False) -> None:
        """Publish with QoS 1 on any topic the device may use (a gateway on its
        children's), str or bytes; only while connected. A broken connection raises, as
        in :meth:`step`."""
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(payload, str):
            payload = payload.encode()
        self.client.publish(topic, payload, retain=retain, qos=1)
        self._last_tx = _ticks_ms()

    # -- telemetry -----------------------------------------------------------------

    def _sample_if_due(self) -> None:
        now = _ticks_ms()
        if self._read_sensors is None or _ticks_diff(now, self._next_reading) < 0:
            return
        step_ms = int(self.interval_s * 1000)
        self._next_reading = _ticks_add(self._next_reading, step_ms)
        if _ticks_diff(now, self._next_reading) >= 0:  # fell behind
            self._next_reading = _ticks_add(now, step_ms)
        self.take_reading()

    def take_reading(self) -> None:
        """Read the sensors into the backlog (sent by the next :meth:`step`)."""
        try:
            values = {}
            for name, value in self._read_sensors().items():
                if value is not None:
                    values[name] = value
        except Exception as exc:
            self._log("fleetline: sensors failed: " + repr(exc))
            return
        if not values:
            return
        reading = {"values": values}
        if clock_valid():  # without a clock, ingest stamps it on arrival
            reading["ts"] = epoch_ms()
        try:
            text = json.dumps(reading).encode()
        except MemoryError:
            gc.collect()  # garbage is what usually fills the heap: once more
            try:
                text = json.dumps(reading).encode()
            except MemoryError as exc:
                self.readings_dropped += 1
                self._short_of_memory(exc)
                return
        self.backlog.append(text)
        self.readings_taken += 1
        excess = len(self.backlog) - self.backlog_readings
        if excess > 0:
            # The oldest go, except those a publish is waiting to have acknowledged.
            before = len(self.backlog)
            del self.backlog[self._in_flight : self._in_flight + excess]
            self.readings_dropped += before - len(self.backlog)
        if self.client is None:
            self._append_backlog(text)
            # Offline, the readings stay: collected now, the garbage of connection
            # attempts does not leave holes between them, and the heap keeps room in one
            # piece for the batches that send them.
            gc.collect()

    def _send_backlog(self) -> None:
        """One reading as an object, several as JSON arrays of up to BATCH_READINGS (fewer
        after a MemoryError); a reading leaves the backlog only once the broker
        acknowledged it. A batch that does not fit in the heap is not a broken
        connection: it is tried again at half its size (a single reading needs no memory
        at all) and the next flush starts at full size again."""
        while self.backlog and self.client is not None:
            count = min(len(self.backlog), self._batch_readings)
            try:
                payload = self._payload(count)
            except MemoryError as exc:
                self._short_of_memory(exc)
                continue
            self._in_flight = count
            try:
                self.client.publish(self._telemetry_topic, payload, retain=False, qos=1)
            finally:
                self._in_flight = 0
            payload = None  # collectable while the next one is built
            self._last_tx = _ticks_ms()
            del self.backlog[:count]
            self.readings_sent += count
        if not self.backlog:
            self._batch_readings = BATCH_READINGS
            if self._file_lines:
                self._clear_backlog_file()

    # -- the backlog in flash ----------------------------------------------------------
    #
    # While offline each reading is appended to ``backlog_file`` (one JSON object a line)
    # as it is taken, and when a connection breaks the readings not yet acknowledged are
    # written there; after a reset the device starts with them. The file is rewritten
    # from memory once it holds twice the backlog's bound (the oldest are dropped then,
    # as in memory), and removed once everything is out, so a device that stays online
    # writes nothing to flash. A reading sent but not acknowledged before a reset is sent
    # again: ingest stores it once (same ts). Flash errors are counted, never fatal.

    def _load_backlog(self) -> None:
        lines = []
        try:
            with open(self._backlog_file, "rb") as f:
                # Only this device's: a board configured anew for another id drops them.
                if f.readline().strip() != self._backlog_header():
                    raise OSError("another device's backlog")
                for line in f:
                    line = line.strip()
                    # A line cut short by a reset mid-write is left out.
                    if line.startswith(b"{") and line.endswith(b"}"):
                        lines.append(line)
        except OSError:
            return  # no file: nothing was left
        excess = len(lines) - self.backlog_readings
        if excess > 0:
            del lines[:excess]
            self.readings_dropped += excess
        self.backlog = lines
        self._file_lines = len(lines)
        self._log("fleetline: " + str(len(lines)) + " readings from before the reset")

    def _backlog_header(self) -> bytes:
        return ("#" + self.device_id).encode()

    def _append_backlog(self, text: bytes) -> None:
        if not self._backlog_file or b'"ts"' not in text:
            # A reading without its own time would be stamped at its late arrival.
            return
        if self._file_lines == 0 or self._file_lines >= 2 * self.backlog_readings:
            self._save_backlog()
            return
        try:
            with open(self._backlog_file, "ab") as f:
                f.write(text + b"\n")
            self._file_lines += 1
        except OSError as exc:
            self._backlog_error(exc)

    def _save_backlog(self) -> None:
        """The backlog written anew: into a temporary file, then renamed over the old
        one, so a reset while writing leaves the previous file whole."""
        if not self._backlog_file:
            return
        temporary = self._backlog_file + ".tmp"
        try:
            import os

            with open(temporary, "wb") as f:
                f.write(self._backlog_header() + b"\n")
                for text in self.backlog:
                    if b'"ts"' in text:
                        f.write(text)
                        f.write(b"\n")
            os.rename(temporary, self._backlog_file)
            self._file_lines = len(self.backlog) or 1
        except OSError as exc:
            self._backlog_error(exc)

    def _clear_backlog_file(self) -> None:
        try:
            import os

            os.remove(self._backlog_file)
        except OSError:
            pass
        self._file_lines = 0

    def _backlog_error(self, exc: BaseException) -> None:
        self.backlog_write_errors += 1
        self._log("fleetline: the backlog file cannot be written: " + repr(exc))

    def _payload(self, count: int) -> bytes | bytearray:
        """The first ``count`` readings of the backlog as one message: the reading itself,
        or a JSON array written into one bytearray of its exact size, the only copy (a
        join, a concatenation and an encode would each make one)."""
        backlog = self.backlog
        if count == 1:
            return backlog[0]
        size = count + 1  # "[", "]" and the commas between
        for i in range(count):
            size += len(backlog[i])
        gc.collect()  # room for the buffer: a backlog leaves the heap fragmented
        payload = bytearray(size)
        payload[0] = 0x5B  # [
        at = 1
        for i in range(count):
            item = backlog[i]
            payload[at : at + len(item)] = item
            at += len(item)
            payload[at] = 0x2C  # , (the last one is overwritten by the ])
            at += 1
        payload[size - 1] = 0x5D  # ]
        return payload

    # -- from the cloud --------------------------------------------------------------

    def _on_message(self, topic: bytes, msg: bytes) -> None:
        """umqtt's callback: queue only (it runs inside publish and subscribe)."""
        if len(self._inbox) >= INBOX_MESSAGES:
            self.messages_dropped += 1
            return
        self._inbox.append((topic, msg if len(msg) <= MAX_MESSAGE_BYTES else None))

    def _handle_inbox(self) -> None:
        while self._inbox and self.client is not None:
            topic, msg = self._inbox.pop(0)
            topic = topic.decode() if isinstance(topic, (bytes, bytearray)) else topic
            if not topic.startswith(self._base):
                if self.on_message is not None:
                    self.on_message(topic, msg)
                continue
            kind = topic[len(self._base) :]
            if kind == "c2d":
                self._take_c2d(msg)
            elif kind == "twin/desired":
                self._take_desired(msg)
            elif kind.startswith("methods/") and kind.endswith("/req"):
                self._answer_method(kind[len("methods/") : -len("/req")], msg)
            elif kind == "transfers/res":
                for extension in self.extensions:
                    extension.on_transfer(msg)

    def _parse(self, msg: bytes | None, what: str) -> dict | None:
        if msg is None:
            self._log("fleetline: a " + what + " larger than the limit was dropped")
            return None
        try:
            doc = json.loads(msg)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self._log("fleetline: a " + what + " is not a JSON object")
            return None
        return doc

    def _take_c2d(self, msg: bytes | None) -> None:
        doc = self._parse(msg, "cloud-to-device message")
        if doc is None:
            return
        message_id = doc.get("id")
        if not isinstance(message_id, str):
            self._log("fleetline: a cloud-to-device message without an id")
            return
        outcome = self._seen_outcomes.get(message_id)
        if outcome is None:  # delivered at least once: act on the first delivery only
            outcome = "complete"
            if self._on_c2d_fn is not None:
                try:
                    if self._on_c2d_fn(doc.get("body"), doc.get("properties") or {}) is False:
                        outcome = "reject"
                except Exception as exc:
                    self._log("fleetline: c2d handler failed: " + repr(exc))
                    outcome = "reject"
            self.c2d_acted += 1
            self._seen_ids.append(message_id)
            self._seen_outcomes[message_id] = outcome
            if len(self._seen_ids) > SEEN_C2D_IDS:
                self._seen_outcomes.pop(self._seen_ids.pop(0), None)
        self._publish(self._base + "c2d/ack", json.dumps({"id": message_id, "outcome": outcome}))

    def _take_desired(self, msg: bytes | None) -> None:
        if msg is not None and len(msg) == 0:  # the retained document was cleared
            return
        doc = self._parse(msg, "desired twin")
        if doc is None:
            return
        version = doc.get("version")
        desired = doc.get("desired")
        if not isinstance(version, int) or not isinstance(desired, dict):
            self._log("fleetline: a desired twin without version or desired")
            return
        # A publish that timed out may arrive after a newer one (README, Device twins).
        if version <= self.desired_version:
            return
        patch = {}
        errors = {}
        for name, apply in self._desired.items():
            try:
                value = apply(desired.get(name))
            except Exception as exc:  # refused: the reported value stays what it was
                errors[name] = str(exc)[:120] or repr(exc)[:120]
                continue
            if value is not NOT_REPORTED:
                patch[name] = value
        for name in desired:
            if name not in self._desired:
                errors[name] = "unknown here"
        for name in errors:
            self._log("fleetline: desired " + name + " not applied: " + errors[name])
        # Why a desired value was refused, beside the values: the operator sees it in the
        # twin. The reported twin merges patches, so a name no longer in error is sent as
        # null, and the whole member once a document is applied whole.
        if errors:
            report = dict(errors)
            for name in self._desired_errors:
                if name not in errors:
                    report[name] = None
            patch["desired_errors"] = report
        elif self._desired_errors:
            patch["desired_errors"] = None
        self._desired_errors = list(errors)
        patch["desired_version"] = version
        self.desired_version = version
        self.report(patch)

    def _apply_interval(self, value: object) -> float:
        if value is None:
            self.interval_s = self.default_interval_s
        elif _is_number(value) and MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
            self.interval_s = value
        else:
            raise ValueError(
                "interval_s must be a number from " + str(MIN_INTERVAL_S) + " to "
                + str(MAX_INTERVAL_S) + ", not " + repr(value)[:40]
            )
        self._next_reading = _ticks_add(_ticks_ms(), int(self.interval_s * 1000))
        return self.interval_s

    def report(self, patch: dict) -> None:
        """Queue a merge patch of reported properties (sent by the next step, or after
        reconnecting: patches merge while waiting)."""
        self._pending_report.update(patch)

    def _answer_method(self, request_id: str, msg: bytes | None) -> None:
        if msg is None:
            status, payload = 413, {"error": "request too large"}
        else:
            doc = self._parse(msg, "method request")
            name = doc.get("method") if doc is not None else None
            if not isinstance(name, str):
                status, payload = 400, {"error": "no method name"}
            else:
                status, payload = self._call(name, doc.get("params"))
        answer = json.dumps({"status": status, "payload": payload})
        self._publish(self._base + "methods/" + request_id + "/res", answer)

    def _call(self, name: str, params: object) -> tuple:
        if name == "ping":
            return 200, {"pong": True, "params": params}
        if name == "reboot" and name not in self._methods:
            if self._reboot_fn is None:
                return 501, {"error": "reboot is not supported here"}
            self._reboot_requested = True  # after the answer is out
            return 200, {"rebooting": True}
        fn = self._methods.get(name)
        if fn is None:
            return 404, {"error": "no method '" + name[:64] + "'"}
        try:
            result = fn(params if params is not None else {})
        except ValueError as exc:
            return 400, {"error": str(exc)}
        except Exception as exc:
            return 500, {"error": repr(exc)}
        if isinstance(result, tuple) and len(result) == 2:
            return result
        return 200, result


def add_switch(
    device: Device, set_on: object, is_on: object, method: str = "switch", prop: str = "relay_on"
) -> None:
    """An on/off output (a relay, an LED) driven by the method ``switch`` (``{"on":
    true}``) and by the desired ``relay_on``; its state is reported as ``relay_on``."""

    def switch(params: dict) -> dict:
        on = params.get("on") if isinstance(params, dict) else None
        if not isinstance(on, bool):
            raise ValueError("params.on must be true or false")
        set_on(on)
        device.report({prop: is_on()})
        return {"on": is_on()}

    def desired(value: object) -> bool:
        if isinstance(value, bool):
            set_on(value)
        elif value is not None:
            raise ValueError(prop + " must be true or false, not " + repr(value)[:40])
        return is_on()

    device._methods[method] = switch
    device._desired[prop] = desired
