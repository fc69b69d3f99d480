"""The API's own connection to the broker, kept up in the background.

``/readyz`` reports it; the API publishes cloud-to-device traffic through it. The API
connects with its own service account (the credentials in ``FLEETLINE_MQTT_URL``) and a
clean session: it holds no subscriptions that must survive it.

Direct methods: on every connect the API subscribes to every device's method responses
(``devices/+/methods/+/res``) with a plain subscription, so each API replica sees each
response and the replica waiting for that request id takes it; the others ignore it.
Request ids are random (uuid4), so no replica or device can guess another's. A call
waits for its answer across reconnects until its own timeout: the device may answer
after the link is back.

Requests of devices: the API takes devices' registration requests
(``provisioning/{enrollment}/{registration id}/register`` and ``.../status``) and their
transfer requests (``devices/{id}/transfers/req``) through shared subscriptions, so one
replica handles each, and answers on ``.../res`` (provisioning.py and transfers.py do the
work). Requests wait in one bounded queue; when it is full (a flood) a request is
dropped, counted and logged, and the device asks again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import Counter, Gauge

from fleetline import mqtt
from fleetline.protocol import MODULES, TOPIC_ROOT, TRANSFER_REQUEST, TRANSFER_RESPONSE, topic_for
from fleetline.settings import MqttProtocol
from fleetline_api.settings import ApiSettings

log = logging.getLogger(__name__)

# After refused credentials, retry this rarely: an operator has to fix them.
AUTH_RETRY_SECONDS = 30.0
# Direct method calls one API process waits on at once; beyond, calls are refused.
MAX_PENDING_CALLS = 10_000
# Method responses of devices and of their modules.
METHOD_RESPONSES = (f"{TOPIC_ROOT}/+/methods/+/res", f"{TOPIC_ROOT}/+/{MODULES}/+/methods/+/res")

PENDING_CALLS = Gauge(
    "fleetline_api_method_calls_pending", "Direct method calls waiting for their answer"
)
PROVISIONING = "provisioning"
PROVISIONING_REQUESTS = (
    f"$share/fleetline-api/{PROVISIONING}/+/+/register",
    f"$share/fleetline-api/{PROVISIONING}/+/+/status",
)
TRANSFER_REQUESTS = (f"$share/fleetline-api/{TOPIC_ROOT}/+/{TRANSFER_REQUEST}",)
# Requests of devices (provisioning, transfers) waiting for a worker, and the workers.
REQUEST_QUEUE = 1000
REQUEST_WORKERS = 4
MAX_REQUEST_PAYLOAD = 1024
PROVISIONING_HANDLED = Counter(
    "fleetline_api_provisioning_requests",
    "Provisioning requests over MQTT by outcome (assigned, failed, throttled, dropped)",
    ["outcome"],
)
TRANSFERS_HANDLED = Counter(
    "fleetline_api_transfer_requests",
    "Transfer requests of devices by HTTP-like status of the answer (dropped: not taken)",
    ["status"],
)


class ProvisioningHandler(Protocol):
    async def register(self, enrollment_id: str, registration_id: str) -> Any: ...

    async def status(self, enrollment_id: str, registration_id: str, operation_id: str) -> Any: ...


class TransferHandler(Protocol):
    async def answer(self, device_id: str, request: dict[str, Any]) -> dict[str, Any]: ...


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """A request's JSON object (empty: {}), or None when it is not one that small."""
    if len(payload) > MAX_REQUEST_PAYLOAD:
        return None
    if not payload.strip():
        return {}
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return request if isinstance(request, dict) else None


class MethodCallError(Exception):
    """A direct method call got no answer."""


class BrokerUnavailableError(MethodCallError):
    """The API is not connected to the broker, or the request could not be published."""


class NotConnectedError(BrokerUnavailableError):
    """The API is not connected to the broker: nothing was sent."""


class TooManyCallsError(MethodCallError):
    """This API process already waits on its maximum of calls."""


class MethodTimeoutError(MethodCallError):
    """The device did not answer within the call's timeout."""


def method_topic(device_id: str, request_id: str, direction: str, module_id: str = "") -> str:
    return topic_for(device_id, f"methods/{request_id}/{direction}", module_id)


@dataclass(frozen=True, slots=True)
class _Pending:
    device_id: str
    module_id: str
    answer: asyncio.Future[bytes]


class BrokerLink:
    def __init__(
        self, settings: ApiSettings, *, max_pending_calls: int = MAX_PENDING_CALLS
    ) -> None:
        self._settings = settings
        self.client: mqtt.Client | None = None
        self.identifier = f"fleetline-api-{socket.gethostname()}-{os.getpid()}"
        self._max_pending = max_pending_calls
        self._pending: dict[str, _Pending] = {}
        self.provisioner: ProvisioningHandler | None = None
        self.transfers: TransferHandler | None = None
        self._requests: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(REQUEST_QUEUE)
        self._dropped_logged = 0.0

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def pending_calls(self) -> int:
        return len(self._pending)

    def _make(self, protocol: MqttProtocol) -> mqtt.Client:
        return mqtt.make_client(
            self._settings.mqtt,
            identifier=self.identifier,
            protocol=protocol,
            persistent=False,
        )

    async def run(self) -> None:
        """Stay connected until cancelled."""
        attempt = 0
        while True:
            try:
                async with mqtt.connected(self._make, self._settings.mqtt_protocol) as client:
                    await self._subscribe(client)
                    self.client = client
                    attempt = 0
                    log.info("connected to the broker as %s", self.identifier)
                    await self._serve(client)
            except mqtt.MqttAuthError as exc:
                log.error("the broker refused the API's credentials: %s", exc)
                self.client = None
                await asyncio.sleep(AUTH_RETRY_SECONDS)
                continue
            except mqtt.MqttError as exc:
                log.warning("broker connection lost: %s", exc)
            except Exception:  # a bug here must not leave the API without a broker for good
                log.exception("broker link failed; reconnecting")
            finally:
                self.client = None
            await asyncio.sleep(mqtt.backoff_seconds(attempt))
            attempt += 1

    async def _subscribe(self, client: mqtt.Client) -> None:
        topics = (
            METHOD_RESPONSES
            + (PROVISIONING_REQUESTS if self.provisioner else ())
            + (TRANSFER_REQUESTS if self.transfers else ())
        )
        result = await client.subscribe([(topic, 1) for topic in topics])
        # Granted QoS per topic: ints (MQTT 3.1.1) or reason codes (MQTT 5); 0x80+ is a refusal.
        codes: list[Any] = list(result) if isinstance(result, list | tuple) else [result]
        if any(int(getattr(code, "value", code)) >= 0x80 for code in codes):
            raise mqtt.MqttError(f"subscription to {topics} refused: {codes}")

    async def _serve(self, client: mqtt.Client) -> None:
        """Take method responses and devices' requests until the connection ends (then
        raise MqttError)."""
        jobs = {f"{self.identifier}.method_responses": self._receive(client)}
        for n in range(REQUEST_WORKERS if self.provisioner or self.transfers else 0):
            jobs[f"{self.identifier}.requests.{n}"] = self._work(client)
        await mqtt.serve(client, jobs)

    async def _receive(self, client: mqtt.Client) -> None:
        async for message in client.messages:
            try:
                payload = message.payload
                raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                self._dispatch(message.topic.value, raw)
            except Exception:  # one message must not end the loop
                log.exception("could not hand over a method response")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Complete the call this response answers, queue a device's request; ignore
        anything else."""
        parts = topic.split("/")
        if parts[0] == PROVISIONING or topic.endswith(f"/{TRANSFER_REQUEST}"):
            self._queue_request(topic, payload)
            return
        if len(parts) == 7 and parts[2] == MODULES:  # devices/{id}/modules/{m}/methods/...
            module_id = parts[3]
            del parts[2:4]
        else:
            module_id = ""
        if len(parts) != 5 or parts[2] != "methods" or parts[4] != "res":
            log.debug("ignored a message on %s", topic)
            return
        device_id, request_id = parts[1], parts[3]
        pending = self._pending.get(request_id)
        # The device (and module) must be the one asked: a response topic names its sender.
        if (
            pending is None
            or pending.device_id != device_id
            or pending.module_id != module_id
            or pending.answer.done()
        ):
            # Another replica's call, or one that timed out already.
            log.debug(
                "method response to no call waiting here",
                extra={"device_id": device_id, "request_id": request_id},
            )
            return
        pending.answer.set_result(payload)

    def _queue_request(self, topic: str, payload: bytes) -> None:
        try:
            self._requests.put_nowait((topic, payload))
        except asyncio.QueueFull:
            if topic.startswith(f"{PROVISIONING}/"):
                PROVISIONING_HANDLED.labels("dropped").inc()
            else:
                TRANSFERS_HANDLED.labels("dropped").inc()
            now = asyncio.get_running_loop().time()
            if now - self._dropped_logged >= 10:
                self._dropped_logged = now
                log.warning(
                    "device requests dropped: %d wait already (devices ask again)",
                    REQUEST_QUEUE,
                )

    async def _work(self, client: mqtt.Client) -> None:
        """Answer queued requests of devices, one at a time."""
        while True:
            topic, payload = await self._requests.get()
            try:
                if topic.startswith(f"{PROVISIONING}/"):
                    await self._answer_provisioning(client, topic, payload)
                else:
                    await self._answer_transfer(client, topic, payload)
            except mqtt.MqttError:
                raise
            except Exception:  # one request must not end the worker
                log.exception("device request failed", extra={"topic": topic})

    async def _answer_transfer(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        assert self.transfers is not None
        device_id = topic.split("/")[1]
        request = _json_object(payload)
        if request is None:
            answer: dict[str, Any] = {
                "status": 400,
                "error": f"the request is a JSON object of {MAX_REQUEST_PAYLOAD} bytes at most",
            }
        else:
            answer = await self.transfers.answer(device_id, request)
            if isinstance(request.get("id"), str | int):
                answer["id"] = request["id"]
        TRANSFERS_HANDLED.labels(str(answer["status"])).inc()
        await client.publish(topic_for(device_id, TRANSFER_RESPONSE), orjson.dumps(answer), qos=1)

    async def _answer_provisioning(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        assert self.provisioner is not None
        _, enrollment_id, registration_id, verb = topic.split("/")
        request = _json_object(payload)
        if request is None:
            answer: dict[str, Any] = {
                "status": "failed",
                "error": f"the request is a JSON object of {MAX_REQUEST_PAYLOAD} bytes at most",
            }
        elif verb == "register":
            answer = (await self.provisioner.register(enrollment_id, registration_id)).as_json()
        else:
            operation = request.get("operation_id")
            answer = (
                (await self.provisioner.status(enrollment_id, registration_id, operation)).as_json()
                if isinstance(operation, str)
                else {"status": "failed", "error": "status needs the operation_id"}
            )
        PROVISIONING_HANDLED.labels(answer["status"]).inc()
        if isinstance(request, dict) and "rid" in request:
            answer["rid"] = request["rid"]
        await client.publish(
            f"{PROVISIONING}/{enrollment_id}/{registration_id}/res", orjson.dumps(answer), qos=1
        )

    async def call(
        self,
        device_id: str,
        request_id: str,
        request: bytes,
        *,
        timeout_seconds: float,
        module_id: str = "",
    ) -> bytes:
        """Publish ``request`` to the device's method request topic (QoS 1) and return the
        raw payload of its answer.

        Raises :class:`BrokerUnavailableError` (:class:`NotConnectedError` when nothing
        was sent), :class:`TooManyCallsError` or :class:`MethodTimeoutError` (the publish
        counts into the timeout).
        """
        client = self.client
        if client is None:
            raise NotConnectedError("the API is not connected to the MQTT broker")
        if len(self._pending) >= self._max_pending:
            raise TooManyCallsError(f"{self._max_pending} calls are in flight")
        if request_id in self._pending:
            raise ValueError(f"request id {request_id} is in use")
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Registered before publishing: the answer may come before the PUBACK.
        self._pending[request_id] = _Pending(device_id, module_id, answer)
        PENDING_CALLS.set(len(self._pending))
        try:
            async with asyncio.timeout(timeout_seconds):
                try:
                    await client.publish(
                        method_topic(device_id, request_id, "req", module_id),
                        request,
                        qos=1,
                        # MQTT 5: dropped once the caller stopped waiting, so a device
                        # with a persistent session runs no stale call when it is back.
                        properties=mqtt.publish_properties(client, expiry_seconds=timeout_seconds),
                    )
                except mqtt.MqttError as exc:
                    raise BrokerUnavailableError(f"could not publish the request: {exc}") from exc
                return await answer
        except TimeoutError:
            raise MethodTimeoutError(f"no answer within {timeout_seconds:g} s") from None
        finally:
            del self._pending[request_id]
            PENDING_CALLS.set(len(self._pending))
