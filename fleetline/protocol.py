"""The device-facing contract (docs/protocol.md): topics, names, and telemetry payload parsing.

``parse_telemetry`` is ingest's hot path: it runs once per MQTT message, so it avoids
regexes for names already seen and allocates one tuple per stored value.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

TOPIC_ROOT = "devices"
TELEMETRY = "telemetry"
STATUS = "status"
# The topic kind after devices/{id}/ (split_device_topic splits on the first two '/'
# only, so a kind may hold more).
TWIN_REPORTED = "twin/reported"
TWIN_DESIRED = "twin/desired"
# Cloud-to-device messages (cloud to device) and the device's acknowledgements of them.
C2D = "c2d"
C2D_ACK = "c2d/ack"
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

# Ids are path segments (in topics and REST paths): "." and ".." are refused.
DEVICE_ID_RE = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.:-]{1,128}\Z")
# Modules: named parts of a device's software, each with its own twin and methods, under
# devices/{id}/modules/{module_id}/ (over the device's own connection).
MODULES = "modules"
MODULE_ID_RE = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.:-]{1,64}\Z")
METRIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# A stored series: a device's metric, or a module's (devices/{id}/modules/{m}/telemetry)
# as "{module_id}/{metric}".
SERIES_NAME_PATTERN = r"^(?:[A-Za-z0-9_.:-]{1,64}/)?[A-Za-z0-9_.-]{1,64}$"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Larger magnitudes are refused: sums over a rollup bucket must stay finite.
MAX_ABS_VALUE = 1e100

# One stored value: (device_id, metric, ts, numeric value, text value).
Row = tuple[str, str, datetime, float | None, str | None]


# Twin documents (desired and reported, and each patch of them): at most this many bytes
# as JSON text, objects and arrays nested at most this deep (the root object is level 1).
# Member names are 1-128 characters without '.', '$', whitespace or control characters,
# so that a dotted path (`reported.fw.version`) names one member unambiguously.
MAX_TWIN_BYTES = 32 * 1024
MAX_TWIN_DEPTH = 8
TWIN_KEY_RE = re.compile(r"[^.$\s\x00-\x1f\x7f]{1,128}\Z")


# Where a JSON path names a member, at most this much of its name is shown.
MAX_PATH_KEY_CHARS = 128


@dataclass(frozen=True, slots=True)
class JsonProblem:
    """What :func:`json_problem` found first: ``too_deep`` (the object or array at
    ``path``), ``member_name`` (``key`` of the object at ``path``) or ``nul`` (the
    string at ``path``)."""

    kind: Literal["too_deep", "member_name", "nul"]
    path: str
    key: str = ""


def _no_nul(key: str) -> bool:
    return "\x00" not in key


def json_problem(
    doc: Any, *, max_depth: int, path: str = "", key_ok: Callable[[str], bool] = _no_nul
) -> JsonProblem | None:
    """The first thing in parsed JSON that a document may not hold: objects or arrays
    nested deeper than ``max_depth`` (the root is level 1), a member name ``key_ok``
    refuses (by default one with a NUL), a string with a NUL (PostgreSQL's jsonb cannot
    store it). Depth first, in document order, without recursion. Paths read
    ``a.b[2]``, under ``path``."""
    # (value, its depth, its path; for an object's member: the object's path, its name)
    stack: list[tuple[Any, int, str, str, str | None]] = [(doc, 1, path, "", None)]
    while stack:
        value, depth, where, parent, key = stack.pop()
        if key is not None and not key_ok(key):
            return JsonProblem("member_name", parent, key)
        kind = type(value)
        if kind is dict:
            if depth > max_depth:
                return JsonProblem("too_deep", where)
            members = [
                (item, depth + 1, _member_path(where, name), where, name)
                for name, item in value.items()
            ]
            stack.extend(reversed(members))
        elif kind is list:
            if depth > max_depth:
                return JsonProblem("too_deep", where)
            items = [
                (item, depth + 1, f"{where}[{i}]", where, None) for i, item in enumerate(value)
            ]
            stack.extend(reversed(items))
        elif kind is str and "\x00" in value:
            return JsonProblem("nul", where)
    return None


def _member_path(path: str, key: str) -> str:
    shown = key[:MAX_PATH_KEY_CHARS]
    return f"{path}.{shown}" if path else shown


def _twin_key_ok(key: str) -> bool:
    return TWIN_KEY_RE.match(key) is not None


def _twin_problem(doc: Any) -> str | None:
    problem = json_problem(doc, max_depth=MAX_TWIN_DEPTH, key_ok=_twin_key_ok)
    if problem is None:
        return None
    path = problem.path
    if problem.kind == "too_deep":
        return f"{path or 'the document'} is nested more than {MAX_TWIN_DEPTH} levels deep"
    if problem.kind == "member_name":
        shown = f"{path}.{problem.key[:40]!r}" if path else repr(problem.key[:40])
        return (
            f"member name {shown} must be 1-128 characters without '.', '$', "
            "whitespace or control characters"
        )
    return f"{path} contains a NUL character"


def twin_patch_problem(patch: Any) -> str | None:
    """Why ``patch`` (parsed JSON) cannot be a twin patch; None when it can. Its size in
    bytes is checked on the raw payload, before parsing."""
    if type(patch) is not dict:
        return "a twin patch must be a JSON object"
    return _twin_problem(patch)


def _json_payload(payload: bytes, max_bytes: int, what: str) -> Any:
    """A device message parsed as JSON; PayloadError when too large or not JSON."""
    if len(payload) > max_bytes:
        raise PayloadError(f"{what} of {len(payload)} bytes exceeds {max_bytes}")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"not JSON: {exc}") from None


def parse_twin_patch(payload: bytes) -> dict[str, Any]:
    """A reported-properties patch from a device (a JSON merge patch, RFC 7396).

    Raises :class:`PayloadError` (the dead-letter reason) when it is unusable."""
    doc = _json_payload(payload, MAX_TWIN_BYTES, "twin patch")
    problem = twin_patch_problem(doc)
    if problem:
        raise PayloadError(problem)
    patch: dict[str, Any] = doc
    return patch


# A device's acknowledgement of a cloud-to-device message:
# {"id": "<message id>", "outcome": "complete" | "reject"} (other members are ignored).
MAX_C2D_ACK_BYTES = 1024
C2D_OUTCOMES = ("complete", "reject")


def parse_c2d_ack(payload: bytes) -> tuple[str, str]:
    """(message id, outcome) of an acknowledgement; the id in canonical UUID form.

    Raises :class:`PayloadError` (the dead-letter reason) when it is unusable."""
    doc = _json_payload(payload, MAX_C2D_ACK_BYTES, "c2d ack")
    if type(doc) is not dict:
        raise PayloadError('a c2d ack must be a JSON object {"id": ..., "outcome": ...}')
    message_id = doc.get("id")
    if type(message_id) is not str:
        raise PayloadError("a c2d ack's 'id' must be the message id (a string)")
    try:
        canonical = str(uuid.UUID(message_id))
    except ValueError:
        raise PayloadError(f"c2d ack id {message_id[:40]!r} is not a message id (a UUID)") from None
    outcome = doc.get("outcome")
    if outcome not in C2D_OUTCOMES:
        raise PayloadError("a c2d ack's 'outcome' must be 'complete' or 'reject'")
    return canonical, outcome


def topic_for(device_id: str, kind: str, module_id: str = "") -> str:
    """The topic of ``kind`` for a device, or for one of its modules (``module_id``)."""
    if module_id:
        return f"{TOPIC_ROOT}/{device_id}/{MODULES}/{module_id}/{kind}"
    return f"{TOPIC_ROOT}/{device_id}/{kind}"


def series_name(module_id: str, metric: str) -> str:
    """The series a module's metric is stored as (:data:`SERIES_NAME_PATTERN`)."""
    return f"{module_id}/{metric}"


def split_module_kind(kind: str) -> tuple[str, str] | None:
    """``modules/{module_id}/{rest}`` (a kind split_device_topic returned) -> (module_id,
    rest); None when it is not a module's topic or the module id is invalid."""
    parts = kind.split("/", 2)
    if len(parts) != 3 or parts[0] != MODULES or MODULE_ID_RE.match(parts[1]) is None:
        return None
    return parts[1], parts[2]


METHODS = "methods"
METHOD_REQUEST = "req"
METHOD_RESPONSE = "res"
# A device asks the API for a transfer URL (firmware download, file upload) and gets it
# on the response topic (services/api/fleetline_api/transfers.py).
TRANSFER_REQUEST = "transfers/req"
TRANSFER_RESPONSE = "transfers/res"


def is_not_ingested(kind: str) -> bool:
    """Whether a kind on a device's topics (or a module's) is one ingest leaves alone:
    what the cloud sends the device (``twin/desired``, ``c2d``, ``methods/{r}/req``,
    ``transfers/res``) and what the API receives (method answers ``methods/{r}/res``,
    ``transfers/req``; a device's own, not a module's)."""
    if kind in (TRANSFER_REQUEST, TRANSFER_RESPONSE):
        return True
    module = split_module_kind(kind)
    if module is not None:
        kind = module[1]
    if kind in (TWIN_DESIRED, C2D):
        return True
    parts = kind.split("/")
    return len(parts) == 3 and parts[0] == METHODS and parts[2] in (METHOD_REQUEST, METHOD_RESPONSE)


def readings_carry_ts(payload: bytes) -> bool:
    """Whether a telemetry payload is a reading, or a list of readings, each with its own
    ``ts``: storing it twice stores it once (a reading without ``ts`` takes the time it
    was received, which differs between two deliveries)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    readings = doc if type(doc) is list else [doc]
    return bool(readings) and all(type(r) is dict and r.get("ts") is not None for r in readings)


def split_device_topic(topic: str) -> tuple[str, str] | None:
    """``devices/{id}/{kind}`` -> (id, kind); None when the topic is not of that shape."""
    parts = topic.split("/", 2)
    if len(parts) != 3 or parts[0] != TOPIC_ROOT:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one telemetry message may hold; anything beyond is dead-lettered."""

    max_payload_bytes: int = 256 * 1024
    max_readings: int = 1000
    max_metrics: int = 256
    max_text_chars: int = 1024
    max_future_seconds: float = 600.0
    oldest: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    # Readings older than this (the raw retention) would be dropped with their partition:
    # they are dead-lettered instead. None: only ``oldest`` applies.
    max_age: timedelta | None = None

    def window(self, received_at: datetime) -> tuple[datetime, datetime]:
        """The earliest and latest ts a message received at ``received_at`` may carry."""
        earliest = self.oldest
        if self.max_age is not None:
            earliest = max(earliest, received_at - self.max_age)
        return earliest, received_at + timedelta(seconds=self.max_future_seconds)


class PayloadError(ValueError):
    """The whole message is unusable; the text is the dead-letter reason."""


class _NameCache:
    """Remembers names that passed the regex; bounded so hostile input cannot grow it."""

    __slots__ = ("_ok", "_re", "_max")

    def __init__(self, pattern: re.Pattern[str], max_entries: int = 200_000) -> None:
        self._ok: set[str] = set()
        self._re = pattern
        self._max = max_entries

    def valid(self, name: str) -> bool:
        if name in self._ok:
            return True
        if self._re.match(name) is None:
            return False
        if len(self._ok) >= self._max:
            self._ok.clear()
        self._ok.add(name)
        return True


device_ids = _NameCache(DEVICE_ID_RE)
metric_names = _NameCache(METRIC_RE)


# (earliest, latest) ts a message's readings may carry, as datetimes and in epoch
# milliseconds: computed once per message (:func:`_window`).
Window = tuple[datetime, datetime, float, float]


def _window(received_at: datetime, limits: Limits) -> Window:
    earliest, latest = limits.window(received_at)
    return earliest, latest, earliest.timestamp() * 1000, latest.timestamp() * 1000


def _parse_ts(raw: Any, received_at: datetime, window: Window, limits: Limits) -> datetime:
    """A reading's ts: RFC 3339 string or epoch milliseconds; absent means received_at.
    (:func:`_reading` takes the common case, integer milliseconds in the window, itself.)"""
    kind = type(raw)
    if raw is None:
        return received_at
    if kind is int or kind is float:  # exact types: a JSON true is not a time
        try:
            ts = EPOCH + timedelta(milliseconds=raw)
        except (OverflowError, ValueError):  # beyond year 9999, or NaN
            raise ValueError(f"ts {raw!r} is out of range") from None
    elif kind is str:
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(f"ts {raw[:40]!r} is not an RFC 3339 time") from None
        if ts.tzinfo is None:
            raise ValueError(f"ts {raw[:40]!r} has no time zone offset")
    else:
        raise ValueError("ts must be an RFC 3339 string or epoch milliseconds")
    earliest, latest = window[0], window[1]
    if ts < earliest:
        if earliest == limits.oldest:
            raise ValueError(f"ts {ts.isoformat()} is before {earliest.date().isoformat()}")
        age = limits.max_age
        shown = f"{age.days} days" if age and age == timedelta(days=age.days) else str(age)
        raise ValueError(f"ts {ts.isoformat()} is older than the retention ({shown})")
    if ts > latest:
        raise ValueError(f"ts {ts.isoformat()} is more than {limits.max_future_seconds:g} s ahead")
    return ts


def _reading(
    device_id: str,
    doc: Any,
    received_at: datetime,
    window: Window,
    limits: Limits,
    out: list[Row],
    where: str,
) -> list[str] | None:
    """Append one reading's values to ``out``; return its problems (None when there are none,
    the common case, so nothing is allocated for it)."""
    if type(doc) is not dict:
        return [f"{where}: a reading must be a JSON object"]
    values = doc.get("values")
    if type(values) is not dict or not values:
        return [f"{where}: 'values' must be a non-empty object"]
    if len(values) > limits.max_metrics:
        return [f"{where}: {len(values)} metrics, more than {limits.max_metrics}"]
    raw = doc.get("ts")
    if type(raw) is int and window[2] <= raw <= window[3]:
        # The common case, about twice as fast as the general one: integer epoch
        # milliseconds in the window (2000 to now + 600 s), where a double holds
        # raw / 1000 to well under half a microsecond, so the datetime is exact.
        ts = datetime.fromtimestamp(raw / 1000, UTC)
    else:
        try:
            ts = _parse_ts(raw, received_at, window, limits)
        except ValueError as exc:
            return [f"{where}: {exc}"]
    errors: list[str] | None = None
    known = metric_names._ok  # noqa: SLF001  (the hot path skips a method call per value)
    for metric, value in values.items():
        if metric not in known and not metric_names.valid(metric):
            problem = f"metric name {metric[:80]!r} is not [A-Za-z0-9_.-]{{1,64}}"
        else:
            kind = type(value)
            if kind is float or kind is int:
                number = float(value) if kind is int else value
                if -MAX_ABS_VALUE <= number <= MAX_ABS_VALUE:  # False for NaN
                    out.append((device_id, metric, ts, number, None))
                    continue
                problem = f"value of {metric!r} is not a number within ±{MAX_ABS_VALUE:g}"
            elif kind is bool:
                out.append((device_id, metric, ts, 1.0 if value else 0.0, None))
                continue
            elif kind is str:
                if len(value) > limits.max_text_chars:
                    problem = f"value of {metric!r} is longer than {limits.max_text_chars} chars"
                elif "\x00" in value:
                    problem = f"value of {metric!r} contains a NUL character"
                else:
                    out.append((device_id, metric, ts, None, value))
                    continue
            else:
                problem = f"value of {metric!r} must be a number, boolean or string"
        if errors is None:
            errors = []
        errors.append(f"{where}: {problem}")
    return errors


def parse_telemetry(
    device_id: str, payload: bytes, received_at: datetime, limits: Limits, out: list[Row]
) -> list[str]:
    """Append the message's values to ``out``; return the problems with its other readings.

    Raises :class:`PayloadError` when nothing in the message can be used.
    """
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    window = _window(received_at, limits)
    if type(doc) is list:
        if not doc:
            raise PayloadError("empty batch")
        if len(doc) > limits.max_readings:
            raise PayloadError(f"batch of {len(doc)} readings exceeds {limits.max_readings}")
        errors: list[str] = []
        for i, item in enumerate(doc):
            problems = _reading(device_id, item, received_at, window, limits, out, "")
            if problems:
                errors += [f"reading[{i}]{p}" for p in problems]
        return errors
    return _reading(device_id, doc, received_at, window, limits, out, "reading") or []
