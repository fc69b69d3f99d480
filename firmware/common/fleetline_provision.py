"""Self-provisioning on first boot (docs/provisioning.md): the device registers itself
through an enrollment and keeps what it was given in flash.

Over MQTT, on the same TLS listener as its later connection: client id = user name =
``$provision/<enrollment>/<registration id>`` (never a device's client id), and either
- a SAS token signed with its registration key (a symmetric-key group's device holds its
  own, base64(HMAC-SHA256(group key, registration id)), derived when it was configured:
  the group key never goes on a device), or
- its client certificate (an X.509 enrollment; no password).
It subscribes to ``provisioning/<enrollment>/<registration id>/res``, publishes
``.../register`` and waits for the answer: ``assigned`` (its device id, its key if it
logs in with one, the MQTT endpoint), ``throttled`` (ask again after ``retry_after_s``)
or ``failed`` (the reason; asked again after a backoff: an operator may fix the
enrollment). The answer goes to ``PROVISIONED_FILE`` (temporary file, then rename), and
the next boots use it without asking. Delete the file to provision again.

MicroPython and CPython alike (tested on the unix port).
"""

import json
import os

import fleetline_device

PROVISIONED_FILE = "provisioned.json"
ANSWER_TIMEOUT_S = 20
RETRY_MIN_S = 5
RETRY_MAX_S = 300


class ProvisioningError(Exception):
    """A registration that did not succeed; ``retry_after_s`` says when to ask again."""

    def __init__(self, message: str, retry_after_s: float = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_mqtt_url(url: str) -> tuple:
    """(host, port) of ``mqtts://host:port`` or ``mqtt://host:port``."""
    tls = url.startswith("mqtts://")
    rest = url.split("://", 1)[1] if "://" in url else url
    host, _, port = rest.partition(":")
    return host, int(port) if port else (8883 if tls else 1883)


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not saved.get("device_id") or not saved.get("host"):
        return None
    return saved


def save(path: str, info: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(info, f)
    os.rename(temporary, path)


class Provisioning:
    """One device's registration. ``mqtt_client`` makes a client as the device core's
    factory does; ``key`` is its registration key (a group's device's own, or an
    individual enrollment's key), empty for an X.509 enrollment: the client's TLS context
    carries the certificate."""

    def __init__(
        self,
        enrollment: str,
        registration_id: str,
        host: str,
        port: int,
        mqtt_client,
        *,
        key: str = "",
        auth: str = "token",
        sync_clock=None,
        feed=None,
        log=print,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.enrollment = enrollment
        self.registration_id = registration_id
        self.host = host
        self.port = port
        self._mqtt_client = mqtt_client
        self.key = key
        self.auth = auth
        self._sync_clock = sync_clock
        self._feed = feed
        self._log = log
        self.answer_timeout_s = answer_timeout_s
        self._base = "provisioning/" + enrollment + "/" + registration_id + "/"
        self._answer = None

    def _password(self):
        if not self.key:
            return ""  # X.509: the certificate is the credential (umqtt sends a password)
        if self.auth == "key":
            return self.key
        if not fleetline_device.clock_valid() and self._sync_clock is not None:
            self._sync_clock()
        if not fleetline_device.clock_valid():
            raise ProvisioningError("the clock is not set: a token cannot be made", RETRY_MIN_S)
        expiry = fleetline_device.epoch_s() + 600
        return fleetline_device.sas_token(self.key, self.registration_id, expiry)

    def _on_message(self, topic: bytes, msg: bytes) -> None:
        if topic.decode() == self._base + "res":
            self._answer = msg

    def _wait(self) -> None:
        if self._feed is not None:
            self._feed()

    def register(self) -> dict:
        """Register once: what the device was assigned (device_id, key, host, port,
        auth), or ProvisioningError."""
        login = "$provision/" + self.enrollment + "/" + self.registration_id
        client = self._mqtt_client(login, self.host, self.port, login, self._password(), 60)
        client.set_callback(self._on_message)
        client.on_wait = self._wait
        self._answer = None
        try:
            client.connect(True)
            client.subscribe((self._base + "res").encode(), qos=1)
            client.publish((self._base + "register").encode(), b'{"rid": 1}', qos=1)
            waited_ms = 0
            while self._answer is None:
                if waited_ms >= self.answer_timeout_s * 1000:
                    raise ProvisioningError("no answer", RETRY_MIN_S)
                client.check_msg()
                self._wait()
                fleetline_device._sleep_ms(100)
                waited_ms += 100
        finally:
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - a closed connection is what we want
                pass
        return self._assigned(json.loads(self._answer))

    def _assigned(self, answer: dict) -> dict:
        status = answer.get("status")
        if status == "throttled":
            raise ProvisioningError("throttled", answer.get("retry_after_s") or RETRY_MIN_S)
        if status != "assigned":
            raise ProvisioningError("refused: " + str(answer.get("error")), RETRY_MAX_S)
        host, port = parse_mqtt_url(answer.get("mqtt_url") or "")
        auth = answer.get("auth") or {}
        return {
            "device_id": answer["device_id"],
            "key": auth.get("key", ""),
            "auth": auth.get("type", "key"),
            "host": host or self.host,
            "port": port,
            "enrollment": self.enrollment,
        }

    def run(self, path: str = PROVISIONED_FILE) -> dict:
        """What a previous boot was given, else register until it succeeds (backing off
        between attempts, feeding the watchdog) and keep the answer in ``path``."""
        saved = load(path)
        if saved is not None:
            return saved
        delay_s = RETRY_MIN_S
        while True:
            self._log("provisioning: registering " + self.registration_id + " through "
                      + self.enrollment)
            try:
                info = self.register()
            except Exception as exc:  # noqa: BLE001 - any failure is retried
                wait_s = getattr(exc, "retry_after_s", 0) or delay_s
                self._log("provisioning: " + repr(exc) + "; again in " + str(wait_s) + " s")
                waited = 0
                while waited < wait_s * 1000:
                    self._wait()
                    fleetline_device._sleep_ms(200)
                    waited += 200
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            save(path, info)
            self._log("provisioning: assigned " + info["device_id"])
            return info
