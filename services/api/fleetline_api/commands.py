"""Commands to devices, one implementation for the REST routes and the job runner.

- :func:`invoke_method`: call a direct method on an online device and wait for its answer
  (routes/methods.py, and method jobs).
- :func:`apply_desired`: merge-patch a device's desired properties and publish the whole
  document, retained (routes/twins.py, and twin jobs).

Each returns what happened or raises a :class:`CommandError`, whose ``status`` is the HTTP
status the routes answer with and the status a job records for the device, and whose
``reason`` is a short word for the outcome (``offline``, ``timeout``...).

Params, payloads and documents are never logged: they may hold secrets.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from fleetline import mqtt, protocol
from fleetline_api.queries import commands as sql
from fleetline_api.schemas.methods import encode_params, params_problem, parse_answer
from fleetline_api.waits import within
from fleetline_api.workers.broker import (
    BrokerLink,
    BrokerUnavailableError,
    MethodTimeoutError,
    NotConnectedError,
    TooManyCallsError,
)

log = logging.getLogger(__name__)

METHOD_OUTCOMES = (
    "invalid",  # 400: params that may not be sent
    "answered",  # the device answered (whatever status it gave)
    "malformed",  # 502
    "timeout",  # 504
    "offline",  # 409
    "not_found",  # 404
    "unavailable",  # 503: no broker connection
    "overloaded",  # 503: too many calls in flight
)
CALLS = Counter("fleetline_api_method_calls_total", "Direct method calls by outcome", ["outcome"])
for _outcome in METHOD_OUTCOMES:
    CALLS.labels(_outcome)
LATENCY = Histogram(
    "fleetline_api_method_call_seconds",
    "From publishing a direct method request to the device's answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

PUBLISH_TIMEOUT_SECONDS = 5.0


class CommandError(Exception):
    """A command that did not get through; ``status`` says why, as an HTTP status."""

    status = 500
    reason = "error"

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})
        # Nothing was sent to the device and nothing was changed: the same command may
        # be tried again later without doing anything twice.
        self.retryable = retryable


class InvalidParamsError(CommandError):
    status = 400
    reason = "invalid"


class DeviceNotFoundError(CommandError):
    status = 404
    reason = "not_found"


class DeviceOfflineError(CommandError):
    status = 409
    reason = "offline"


class VersionMismatchError(CommandError):
    status = 412
    reason = "version_mismatch"


class DocumentTooLargeError(CommandError):
    status = 413
    reason = "too_large"


class MalformedAnswerError(CommandError):
    status = 502
    reason = "malformed"


class BrokerDownError(CommandError):
    status = 503
    reason = "unavailable"


class OverloadedError(CommandError):
    status = 503
    reason = "overloaded"


class DatabaseSlowError(CommandError):
    status = 503
    reason = "database"


class NoAnswerError(CommandError):
    status = 504
    reason = "timeout"


# --- direct methods ---------------------------------------------------------------

# The least of a call's timeout left for the device to answer (or half of the timeout,
# if that is less): with less left, the call is not sent.
MIN_ANSWER_SECONDS = 1.0


def target_name(device_id: str, module_id: str = "") -> str:
    """How messages name a device or one of its modules."""
    return f"module {device_id}/{module_id}" if module_id else f"device {device_id}"


@dataclass(frozen=True, slots=True)
class MethodAnswer:
    request_id: str
    status: int  # the device's own code
    payload: Any


async def invoke_method(
    pool: Any,
    broker: BrokerLink,
    device_id: str,
    name: str,
    params: dict[str, Any],
    *,
    timeout_s: float,
    module_id: str = "",
    before_send: Callable[[], Awaitable[None]] | None = None,
    since: float | None = None,
) -> MethodAnswer:
    """Call ``name`` on the device (or its module ``module_id``) with ``params`` and wait
    up to ``timeout_s`` for its answer. Only a device whose status is online is called (a
    module speaks over its device's connection).

    ``timeout_s`` bounds the whole call, counted from ``since`` (time.monotonic(); the
    request's arrival) or from now: a database that does not answer (paused, failing
    over) holds the caller no longer, and a call left with too little time for the
    device is not sent (DatabaseSlowError, 503).

    ``before_send`` is awaited just before the request is published (nothing is sent
    when it raises): the job runner confirms there that it still holds the device."""
    problem = params_problem(params)
    if problem:
        CALLS.labels("invalid").inc()
        raise InvalidParamsError(problem)
    deadline = (time.monotonic() if since is None else since) + timeout_s

    def too_slow() -> DatabaseSlowError:
        CALLS.labels("unavailable").inc()
        return DatabaseSlowError(
            f"the database was too slow to leave the device any of the call's {timeout_s:g} s;"
            " nothing was sent",
            headers={"Retry-After": "5"},
            retryable=True,
        )

    async def lookup() -> Any:
        # Waiting for a connection is bounded too: no backlog of lookups builds up
        # behind a stalled database.
        async with pool.acquire(timeout=max(0.001, deadline - time.monotonic())) as con:
            return await con.fetchrow(sql.DEVICE_ONLINE, device_id, module_id)

    try:
        exists = await within(max(0.0, deadline - time.monotonic()), lookup())
    except TimeoutError:
        raise too_slow() from None
    if exists is None or not exists["module_exists"]:
        CALLS.labels("not_found").inc()
        raise DeviceNotFoundError(f"{target_name(device_id, module_id)} not found")
    if exists["online"] is not True:
        CALLS.labels("offline").inc()
        raise DeviceOfflineError(f"device {device_id} is offline")
    request_id = uuid.uuid4().hex
    request = b'{"method":%s,"params":%s}' % (json.dumps(name).encode(), encode_params(params))
    fields = {"device_id": device_id, "method": name, "request_id": request_id}
    if module_id:
        fields["module_id"] = module_id
    if before_send is not None:
        await before_send()
    if deadline - time.monotonic() < min(MIN_ANSWER_SECONDS, timeout_s / 2):
        raise too_slow()
    started = time.monotonic()
    try:
        raw = await broker.call(
            device_id,
            request_id,
            request,
            timeout_seconds=max(0.0, deadline - time.monotonic()),
            module_id=module_id,
        )
    except BrokerUnavailableError as exc:
        CALLS.labels("unavailable").inc()
        log.warning("method call not sent: %s", exc, extra=fields)
        raise BrokerDownError(
            str(exc),
            headers={"Retry-After": "5"},
            retryable=isinstance(exc, NotConnectedError),
        ) from None
    except TooManyCallsError as exc:
        CALLS.labels("overloaded").inc()
        log.warning("method call refused: %s", exc, extra=fields)
        raise OverloadedError(
            f"too many calls in flight ({exc})", headers={"Retry-After": "1"}, retryable=True
        ) from None
    except MethodTimeoutError:
        CALLS.labels("timeout").inc()
        log.info("method call timed out", extra={**fields, "timeout_s": timeout_s})
        raise NoAnswerError(
            f"{target_name(device_id, module_id)} did not answer {name} within {timeout_s:g} s "
            f"(request {request_id})"
        ) from None
    elapsed = time.monotonic() - started
    LATENCY.observe(elapsed)
    duration_ms = round(elapsed * 1000, 1)
    answer = parse_answer(raw)
    if answer is None:
        CALLS.labels("malformed").inc()
        log.warning(
            "device answered with a malformed response",
            extra={**fields, "bytes": len(raw), "duration_ms": duration_ms},
        )
        raise MalformedAnswerError(
            f"device answered with a malformed response (request {request_id})"
        )
    CALLS.labels("answered").inc()
    log.info(
        "method call answered",
        extra={**fields, "status": answer.status, "duration_ms": duration_ms},
    )
    return MethodAnswer(request_id=request_id, status=answer.status, payload=answer.payload)


# --- desired properties -------------------------------------------------------------


def etag(version: int) -> str:
    return f'"{version}"'


def if_match_matches(if_match: str, version: int) -> bool:
    """RFC 9110 §13.1.1: ``*`` or a list of strong entity tags; weak tags never match.
    A bare number is taken as the version too, for clients that drop the quotes."""
    for tag in (t.strip() for t in if_match.split(",")):
        if tag == "*" or tag == etag(version) or tag == str(version):
            return True
    return False


@dataclass(frozen=True, slots=True)
class DesiredApplied:
    version: int  # the desired version after the patch
    changed: bool  # false: the patch changed nothing, the version stayed
    published: bool  # the document went out, retained
    publish_error: str | None = None


async def publish_desired(
    pool: Any, broker: BrokerLink, device_id: str, module_id: str = ""
) -> int:
    """Publish the current desired document, retained; the version published (the row
    lock is held meanwhile, so publishes of one twin happen in version order); 0 when
    the device (or module) is gone."""
    client = broker.client
    async with pool.acquire() as con, con.transaction():
        row = await con.fetchrow(sql.LOCK_FOR_PUBLISH, device_id, module_id)
        if row is None:  # deleted meanwhile
            return 0
        if client is None:
            raise ConnectionError("not connected to the broker")
        payload = orjson.dumps({"version": row["version"], "desired": row["desired"]})
        await client.publish(
            protocol.topic_for(device_id, protocol.TWIN_DESIRED, module_id),
            payload,
            qos=1,
            retain=True,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )
        await con.execute(sql.MARK_PUBLISHED, device_id, module_id, row["version"])
        version: int = row["version"]
        return version


async def apply_desired(
    pool: Any,
    broker: BrokerLink,
    device_id: str,
    patch: dict[str, Any],
    *,
    if_match: str | None = None,
    module_id: str = "",
    before_apply: Callable[[Any], Awaitable[None]] | None = None,
) -> DesiredApplied:
    """Merge ``patch`` (checked already: protocol.twin_patch_problem and its size) into
    the device's desired properties, then publish the whole document retained.

    A failed publish leaves the change committed (the next patch, even ``{}``, publishes
    again): it is logged and returned as ``published=False``.

    ``before_apply`` is awaited with the connection, first thing in the transaction that
    applies the patch (it rolls back, changing nothing, when that raises): the job runner
    confirms there that it still holds the device."""
    if broker.client is None:
        raise BrokerDownError(
            "the API is not connected to the broker; nothing was changed",
            headers={"Retry-After": "5"},
            retryable=True,
        )
    async with pool.acquire() as con, con.transaction():
        if before_apply is not None:
            await before_apply(con)
        if module_id and await con.fetchval(sql.LOCK_MODULE, device_id, module_id) is None:
            raise DeviceNotFoundError(f"{target_name(device_id, module_id)} not found")
        await con.execute(sql.ENSURE_DESIRED, device_id, module_id)
        current: int | None = await con.fetchval(sql.LOCK_DESIRED, device_id, module_id)
        if current is None:
            raise DeviceNotFoundError(f"device {device_id} not found")
        if if_match is not None and not if_match_matches(if_match, current):
            raise VersionMismatchError(
                f"the desired properties are at version {current}; If-Match was {if_match[:80]!r}",
                headers={"ETag": etag(current)},
            )
        changed: int | None = await con.fetchval(
            sql.APPLY_DESIRED, device_id, module_id, patch, protocol.MAX_TWIN_BYTES
        )
        if changed is None:
            size = await con.fetchval(sql.DESIRED_SIZE, device_id, module_id, patch)
            if size is not None and size > protocol.MAX_TWIN_BYTES:
                raise DocumentTooLargeError(
                    f"the desired document would be {size} bytes, "
                    f"more than {protocol.MAX_TWIN_BYTES}"
                )
    version = changed if changed is not None else current
    try:
        await publish_desired(pool, broker, device_id, module_id)
    except Exception as exc:  # committed: the next patch publishes it (routes/twins.py)
        log.error(
            "desired twin stored but not published: %r",
            exc,
            extra={"device_id": device_id, "module_id": module_id, "version": version},
        )
        return DesiredApplied(version, changed is not None, False, repr(exc))
    return DesiredApplied(version, changed is not None, True)


async def clear_desired(broker: BrokerLink, device_id: str, module_ids: list[str]) -> None:
    """Remove the desired documents the broker retains for a device ('' in ``module_ids``)
    or its modules, once they are deleted: one registered again with the same id must
    not receive the old desired state. An empty retained message removes the retained
    one (MQTT 3.3.1.3). Failures are logged: the deletion stands."""
    client = broker.client
    for module_id in module_ids:
        try:
            if client is None:
                raise ConnectionError("not connected to the broker")
            await client.publish(
                protocol.topic_for(device_id, protocol.TWIN_DESIRED, module_id),
                b"",
                qos=1,
                retain=True,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (mqtt.MqttError, ConnectionError, TimeoutError) as exc:
            log.warning(
                "%s deleted, but its retained desired document stays at the broker: %s",
                target_name(device_id, module_id),
                exc,
                extra={"device_id": device_id, "module_id": module_id},
            )
