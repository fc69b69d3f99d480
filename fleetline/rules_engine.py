"""Rule evaluation as pure code: the state machine of one (rule, device).

Shared by the rules service (live readings, a ticker for the passing of time) and the
api (``POST /v1/rules/{id}/backtest`` replays stored readings), so a backtest gives the
alarms live evaluation raised on the same data. Nothing here does I/O.

A threshold rule, per device::

    idle ──raise holds──> pending ──held for raise.for_s──> active
     ^  <──raise fails───┘                                 │  ^
     │                                   clear holds       │  │ raise holds again, or
     │                                                     v  │ neither (hysteresis band)
     └───────────────held for clear.for_s───────────── clearing

- Time is the readings' own ``ts``. A condition holds from the reading that made it true
  until a reading that makes it false, so a device that goes quiet after one reading
  over the threshold still raises ``for_s`` later: :func:`advance` moves the clock (the
  service's ticker calls it with the wall clock; a reading first advances to its ts).
  A timed transition is dated when it became due (``since + for_s``), not when it was
  noticed, so ticks at any rate give the same alarms.
- Hysteresis: the clear condition is separate (raise above 30, clear below 28); between
  the two an active alarm stays active and an idle rule stays idle, so values dancing
  around one threshold do not flap. Without a clear condition an alarm clears when the
  raise condition no longer holds (``for_s`` 0).
- Deduplication: while an alarm is open, readings update its value, peak and count.
- A reading older than (or as old as) the last one evaluated is skipped: replays and
  redeliveries change nothing, and a backtest in time order sees what live saw.
- ``rate>``: change per second from the previous reading of the same (rule, device).

A ``no_data`` rule raises when a device has sent nothing for ``timeout_s`` (dated at the
last reading plus the timeout) or as soon as it reports ``offline`` (its Last Will), and
clears on its next reading or ``online``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

# The api notifies this channel in the transaction of every rule write, with
# {"rule_id": n} or, after a manual clear, {"cleared": [rule_id, device_id]}; the rules
# service listens and reloads.
RULES_CHANNEL = "fleetline_rules"
# The api notifies this channel, with {"route_id": n}, in the transaction of every
# message route write; the rules service reloads its routes.
ROUTES_CHANNEL = "fleetline_routes"
OPS = (">", ">=", "<", "<=", "==", "!=", "outside", "rate>")
# A message route's condition judges one reading on its own: no rate, no duration.
ROUTE_OPS = (">", ">=", "<", "<=", "==", "!=", "outside")
Op = Literal[">", ">=", "<", "<=", "==", "!=", "outside", "rate>"]
Kind = Literal["threshold", "no_data"]
SEVERITIES = ("critical", "major", "minor", "warning", "info")


class RuleDefinitionError(ValueError):
    """A stored rule that cannot be evaluated (the API validates rules before storing)."""


@dataclass(frozen=True, slots=True)
class Condition:
    op: Op
    value: float | None = None
    low: float | None = None
    high: float | None = None
    for_s: float = 0.0

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Condition:
        op = doc.get("op")
        if op not in OPS:
            raise RuleDefinitionError(f"unknown op {op!r}")

        def number(name: str) -> float | None:
            raw = doc.get(name)
            return None if raw is None else float(raw)

        cond = cls(
            op=op,
            value=number("value"),
            low=number("low"),
            high=number("high"),
            for_s=float(doc.get("for_s") or 0.0),
        )
        if op == "outside":
            if cond.low is None or cond.high is None:
                raise RuleDefinitionError("'outside' needs low and high")
        elif cond.value is None:
            raise RuleDefinitionError(f"{op!r} needs a value")
        return cond

    def holds(self, value: float, rate: float | None) -> bool:
        op, ref = self.op, self.value
        if op == "outside":
            assert self.low is not None and self.high is not None
            return value < self.low or value > self.high
        assert ref is not None
        if op == ">":
            return value > ref
        if op == ">=":
            return value >= ref
        if op == "<":
            return value < ref
        if op == "<=":
            return value <= ref
        if op == "==":
            return value == ref
        if op == "!=":
            return value != ref
        return rate is not None and rate > ref  # rate>

    def extremity(self, value: float) -> float:
        """How far into alarm territory ``value`` is: the peak is the value maximising it."""
        op = self.op
        if op in ("<", "<="):
            return -value
        if op == "outside":
            assert self.low is not None and self.high is not None
            return max(self.low - value, value - self.high)
        if op == "!=":
            assert self.value is not None
            return abs(value - self.value)
        if op == "==":
            return 0.0
        return value  # >, >=, rate> (the highest value seen)


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    name: str
    kind: Kind
    metric: str | None = None
    raise_when: Condition | None = None
    # None: clears when ``raise_when`` no longer holds.
    clear_when: Condition | None = None
    timeout_s: float | None = None
    severity: str = "major"
    message: str = ""
    devices: frozenset[str] = frozenset()
    tags: Mapping[str, Any] = field(default_factory=dict)
    actions: tuple[Mapping[str, Any], ...] = ()
    version: int = 1

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Rule:
        """From a ``rules`` row (jsonb columns decoded)."""
        kind = row["kind"]
        if kind not in ("threshold", "no_data"):
            raise RuleDefinitionError(f"unknown kind {kind!r}")
        match = row.get("match") or {}
        raise_doc, clear_doc = row.get("raise_condition"), row.get("clear_condition")
        rule = cls(
            id=int(row["id"]),
            name=str(row["name"]),
            kind=kind,
            metric=row.get("metric"),
            raise_when=Condition.from_doc(raise_doc) if raise_doc else None,
            clear_when=Condition.from_doc(clear_doc) if clear_doc else None,
            timeout_s=None if row.get("timeout_s") is None else float(row["timeout_s"]),
            severity=str(row.get("severity") or "major"),
            message=str(row.get("message") or ""),
            devices=frozenset(match.get("devices") or ()),
            tags=dict(match.get("tags") or {}),
            actions=tuple(row.get("actions") or ()),
            version=int(row.get("version") or 1),
        )
        if kind == "threshold" and (rule.metric is None or rule.raise_when is None):
            raise RuleDefinitionError("a threshold rule needs a metric and a raise condition")
        if kind == "no_data" and not rule.timeout_s:
            raise RuleDefinitionError("a no_data rule needs timeout_s")
        return rule

    def matches(self, device_id: str, tags: Mapping[str, Any]) -> bool:
        """Listed, or carrying all the rule's tags; a rule naming neither takes every device."""
        if not self.devices and not self.tags:
            return True
        if device_id in self.devices:
            return True
        return bool(self.tags) and all(tags.get(k) == v for k, v in self.tags.items())


class Phase(StrEnum):
    IDLE = "idle"
    PENDING = "pending"
    ACTIVE = "active"
    CLEARING = "clearing"


class Event(StrEnum):
    PENDING = "pending"  # the raise condition started to hold (timer started)
    CANCELLED = "cancelled"  # it stopped holding before for_s
    RAISED = "raised"
    UPDATED = "updated"  # an open alarm's value, peak or count changed
    CLEARING = "clearing"  # the clear condition started to hold (clear delay started)
    RESUMED = "resumed"  # it stopped holding before the clear delay: still active
    CLEARED = "cleared"


@dataclass(slots=True)
class State:
    """What one (rule, device) remembers; the rules service persists the timers."""

    phase: Phase = Phase.IDLE
    # pending: since when the raise condition holds; clearing: the clear condition.
    since: datetime | None = None
    # The last reading evaluated (no_data: the last sign of life) and its value.
    last_ts: datetime | None = None
    last_value: float | None = None
    # The open alarm (or the episode being timed while pending).
    value: float | None = None
    peak: float | None = None
    count: int = 0
    # no_data: the newest status seen, and whether it said offline.
    status_at: datetime | None = None
    offline: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    event: Event
    at: datetime
    # The alarm's figures right after this transition.
    value: float | None = None
    peak: float | None = None
    count: int = 0


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def _emit(state: State, event: Event, at: datetime) -> Transition:
    return Transition(event, at, state.value, state.peak, state.count)


def _track(rule: Rule, state: State, value: float, raising: bool) -> None:
    """Fold a reading into the episode's value, peak and count."""
    state.value = value
    cond = rule.raise_when
    if state.peak is None or (
        cond is not None and cond.extremity(value) > cond.extremity(state.peak)
    ):
        state.peak = value
    if raising:
        state.count += 1


def _start_episode(state: State) -> None:
    state.value = state.peak = None
    state.count = 0


def advance(rule: Rule, state: State, now: datetime) -> list[Transition]:
    """Transitions that became due by ``now`` with no reading in between."""
    out: list[Transition] = []
    if rule.kind == "no_data":
        if state.phase is not Phase.ACTIVE and state.last_ts is not None and not state.offline:
            assert rule.timeout_s is not None
            due = state.last_ts + timedelta(seconds=rule.timeout_s)
            if now >= due:
                _start_episode(state)
                state.count = 1
                state.phase = Phase.ACTIVE
                out.append(_emit(state, Event.RAISED, due))
        return out
    if state.phase is Phase.PENDING:
        assert state.since is not None and rule.raise_when is not None
        due = state.since + timedelta(seconds=rule.raise_when.for_s)
        if now >= due:
            state.phase, state.since = Phase.ACTIVE, None
            out.append(_emit(state, Event.RAISED, due))
    elif state.phase is Phase.CLEARING:
        assert state.since is not None
        delay = rule.clear_when.for_s if rule.clear_when is not None else 0.0
        due = state.since + timedelta(seconds=delay)
        if now >= due:
            state.phase, state.since = Phase.IDLE, None
            out.append(_emit(state, Event.CLEARED, due))
    return out


def evaluate(rule: Rule, state: State, ts: datetime, value: float | None) -> list[Transition]:
    """One reading: ``value`` of ``rule.metric`` (threshold rules), or any reading at
    ``ts`` (no_data rules, ``value`` unused). Mutates ``state``; returns what happened."""
    out = advance(rule, state, ts)
    if state.last_ts is not None and ts <= state.last_ts:
        return out
    if rule.kind == "no_data":
        state.last_ts = ts
        if state.status_at is None or ts > state.status_at:
            state.offline = False
        if state.phase is Phase.ACTIVE and not state.offline:
            state.phase = Phase.IDLE
            out.append(_emit(state, Event.CLEARED, ts))
        return out
    if value is None or not math.isfinite(value):
        return out
    assert rule.raise_when is not None
    rate: float | None = None
    if state.last_ts is not None and state.last_value is not None:
        dt = _seconds(ts - state.last_ts)
        if dt > 0:
            rate = (value - state.last_value) / dt
    state.last_ts, state.last_value = ts, value
    raising = rule.raise_when.holds(value, rate)
    if rule.clear_when is None:
        clearing = not raising
    else:
        clearing = not raising and rule.clear_when.holds(value, rate)
    phase = state.phase
    if phase is Phase.IDLE:
        if raising:
            _start_episode(state)
            _track(rule, state, value, raising)
            if rule.raise_when.for_s <= 0:
                state.phase = Phase.ACTIVE
                out.append(_emit(state, Event.RAISED, ts))
            else:
                state.phase, state.since = Phase.PENDING, ts
                out.append(_emit(state, Event.PENDING, ts))
    elif phase is Phase.PENDING:
        if raising:
            _track(rule, state, value, raising)
        else:
            state.phase, state.since = Phase.IDLE, None
            _start_episode(state)
            out.append(_emit(state, Event.CANCELLED, ts))
    else:  # ACTIVE or CLEARING: the alarm is open
        _track(rule, state, value, raising)
        if phase is Phase.ACTIVE and clearing:
            delay = rule.clear_when.for_s if rule.clear_when is not None else 0.0
            if delay <= 0:
                state.phase = Phase.IDLE
                out.append(_emit(state, Event.CLEARED, ts))
                return out
            state.phase, state.since = Phase.CLEARING, ts
            out.append(_emit(state, Event.CLEARING, ts))
        elif phase is Phase.CLEARING and not clearing:
            state.phase, state.since = Phase.ACTIVE, None
            out.append(_emit(state, Event.RESUMED, ts))
        out.append(_emit(state, Event.UPDATED, ts))
    return out


def status(rule: Rule, state: State, online: bool, ts: datetime) -> list[Transition]:
    """A device's ``online``/``offline`` status message (no_data rules only)."""
    if rule.kind != "no_data" or (state.status_at is not None and ts <= state.status_at):
        return []
    state.status_at = ts
    if online:
        state.offline = False
        if state.last_ts is None or ts > state.last_ts:
            state.last_ts = ts
        if state.phase is Phase.ACTIVE:
            state.phase = Phase.IDLE
            return [_emit(state, Event.CLEARED, ts)]
        return []
    if state.last_ts is not None and state.last_ts > ts:
        return []  # it sent a reading after this status: it is not offline
    state.offline = True
    if state.phase is Phase.ACTIVE:
        return []
    _start_episode(state)
    state.count = 1
    state.phase = Phase.ACTIVE
    return [_emit(state, Event.RAISED, ts)]


def reset(rule: Rule, state: State, at: datetime) -> None:
    """Someone cleared the alarm by hand: start over from ``at``. If the last value still
    meets the raise condition, it holds from ``at`` on, so a threshold rule raises again
    ``for_s`` later unless a reading says otherwise; a no_data rule raises again after a
    new ``timeout_s`` of silence."""
    state.phase, state.since = Phase.IDLE, None
    _start_episode(state)
    if rule.kind == "no_data":
        state.offline = False
        if state.last_ts is None or at > state.last_ts:
            state.last_ts = at
        return
    cond = rule.raise_when
    if cond is not None and cond.op != "rate>" and state.last_value is not None:
        if cond.holds(state.last_value, None):
            _track(rule, state, state.last_value, True)
            state.phase, state.since = Phase.PENDING, at


# -- message templates ----------------------------------------------------------------

_FIELD_RE = re.compile(r"\{([a-z_]+)\}")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    return "" if value is None else str(value)


def render(rule: Rule, device_id: str, value: float | None, peak: float | None, count: int) -> str:
    """The rule's message with ``{device_id}``, ``{value}``, ``{peak}``, ``{count}``,
    ``{rule}``, ``{metric}``, ``{severity}`` filled in; other braces are left as they are
    (no attribute access: a template cannot reach into objects)."""
    fields = {
        "device_id": device_id,
        "value": value,
        "peak": peak,
        "count": count,
        "rule": rule.name,
        "metric": rule.metric,
        "severity": rule.severity,
    }
    template = rule.message or (
        "{rule}: {device_id} offline"
        if rule.kind == "no_data"
        else "{rule}: {device_id} {metric}={value}"
    )
    return _FIELD_RE.sub(
        lambda m: _shown(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template
    )


# -- backtest -----------------------------------------------------------------------


@dataclass(slots=True)
class SimulatedAlarm:
    device_id: str
    raised_at: datetime
    cleared_at: datetime | None = None
    value: float | None = None
    peak: float | None = None
    count: int = 0
    message: str = ""


def replay(
    rule: Rule,
    readings: Iterable[tuple[str, datetime, float | None]],
    until: datetime,
    *,
    states: Mapping[str, State] | None = None,
) -> list[SimulatedAlarm]:
    """The alarms ``rule`` raises on ``readings`` ((device, ts, value) in ts order per
    device), with the clock advanced to ``until`` at the end."""
    own: dict[str, State] = dict(states or {})
    open_alarms: dict[str, SimulatedAlarm] = {}
    alarms: list[SimulatedAlarm] = []

    def apply(device_id: str, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            if t.event is Event.RAISED:
                alarm = SimulatedAlarm(device_id, t.at)
                open_alarms[device_id] = alarm
                alarms.append(alarm)
            alarm_now = open_alarms.get(device_id)
            if alarm_now is None:
                continue
            if t.event in (Event.RAISED, Event.UPDATED, Event.CLEARED):
                alarm_now.value, alarm_now.peak, alarm_now.count = t.value, t.peak, t.count
                alarm_now.message = render(rule, device_id, t.value, t.peak, t.count)
            if t.event is Event.CLEARED:
                alarm_now.cleared_at = t.at
                del open_alarms[device_id]

    for device_id, ts, value in readings:
        state = own.get(device_id)
        if state is None:
            state = own[device_id] = State()
        apply(device_id, evaluate(rule, state, ts, value))
    for device_id, state in own.items():
        apply(device_id, advance(rule, state, until))
    alarms.sort(key=lambda a: (a.raised_at, a.device_id))
    return alarms
