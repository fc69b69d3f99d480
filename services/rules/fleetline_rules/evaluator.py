"""Which rules a reading concerns, and the state of every (rule, device) in memory.

The rule set is indexed per device: the first reading of a device computes, once, the
rules that match it grouped by metric; later readings look their metrics up in that
map, so a reading costs its own metrics, not the number of rules (bench/rules.py
compares this with evaluating every rule). The map is rebuilt when rules or tags change.

The state machine itself is :mod:`fleetline.rules_engine`, shared with the API's
backtest. This module does no I/O: the service persists the changes it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetline import rules_engine as engine
from fleetline.protocol import Row
from fleetline.rules_engine import Event, Phase, Rule, State, Transition

Key = tuple[int, str]  # (rule id, device id)
_TIMED = (Phase.PENDING, Phase.CLEARING)


@dataclass(frozen=True, slots=True)
class Change:
    rule: Rule
    device_id: str
    transition: Transition


@dataclass(frozen=True, slots=True)
class DeviceRules:
    by_metric: Mapping[str, tuple[Rule, ...]]
    no_data: tuple[Rule, ...]


class RuleSet:
    """Enabled rules, with the per-device index.

    A device's rules are found without looking at every rule: rules naming no device and
    no tag apply to all; the others are indexed by the devices they list and by one of
    their tags (name, value), and only those candidates are checked in full.
    """

    def __init__(self, rules: Iterable[Rule], tags: Mapping[str, Mapping[str, Any]]) -> None:
        self.rules: dict[int, Rule] = {r.id: r for r in rules}
        self.tags = tags
        self.no_data = tuple(r for r in self.rules.values() if r.kind == "no_data")
        self._everywhere: list[Rule] = []
        self._by_device: dict[str, list[Rule]] = {}
        self._by_tag: dict[tuple[str, Any], list[Rule]] = {}
        for rule in self.rules.values():
            if not rule.devices and not rule.tags:
                self._everywhere.append(rule)
                continue
            for device_id in rule.devices:
                self._by_device.setdefault(device_id, []).append(rule)
            if rule.tags:
                name = min(rule.tags)
                self._by_tag.setdefault((name, _hashable(rule.tags[name])), []).append(rule)
        self._devices: dict[str, DeviceRules] = {}

    def candidates(self, device_id: str, tags: Mapping[str, Any]) -> list[Rule]:
        found = {r.id: r for r in self._everywhere}
        for rule in self._by_device.get(device_id, ()):
            found[rule.id] = rule
        for name, value in tags.items():
            for rule in self._by_tag.get((name, _hashable(value)), ()):
                found[rule.id] = rule
        return [r for _id, r in sorted(found.items())]

    def for_device(self, device_id: str) -> DeviceRules:
        found = self._devices.get(device_id)
        if found is None:
            tags = self.tags.get(device_id, {})
            by_metric: dict[str, list[Rule]] = {}
            no_data: list[Rule] = []
            for rule in self.candidates(device_id, tags):
                if not rule.matches(device_id, tags):
                    continue
                if rule.kind == "no_data":
                    no_data.append(rule)
                else:
                    assert rule.metric is not None
                    by_metric.setdefault(rule.metric, []).append(rule)
            found = DeviceRules({m: tuple(rs) for m, rs in by_metric.items()}, tuple(no_data))
            if len(self._devices) > 1_000_000:  # bounded: hostile device ids cannot grow it
                self._devices.clear()
            self._devices[device_id] = found
        return found


def _hashable(value: Any) -> Any:
    """Tag values are JSON scalars; anything else (never stored) is keyed by its text."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class Evaluator:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.states: dict[Key, State] = {}
        # States with a timer running (pending, clearing): what the ticker looks at.
        self.timed: set[Key] = set()
        # Open alarms whose value, peak or count changed since the last flush.
        self.dirty: set[Key] = set()
        # Rate rules' previous values changed since the last flush.
        self.dirty_rates: set[Key] = set()
        # States of no_data rules: the ticker checks their timeouts.
        self.watched: set[Key] = set()
        self.evaluated = 0

    def state(self, key: Key) -> State:
        found = self.states.get(key)
        if found is None:
            found = self.states[key] = State()
        return found

    def watch(self, key: Key) -> State:
        """The state of a no_data rule's device, which the ticker then checks."""
        self.watched.add(key)
        return self.state(key)

    def _collect(
        self,
        rule: Rule,
        device_id: str,
        state: State,
        transitions: list[Transition],
        out: list[Change],
    ) -> None:
        key = (rule.id, device_id)
        if state.phase in _TIMED:
            self.timed.add(key)
        else:
            self.timed.discard(key)
        for t in transitions:
            if t.event is Event.UPDATED:
                self.dirty.add(key)
            else:
                out.append(Change(rule, device_id, t))

    def reading(self, device_id: str, rows: list[Row], received_at: datetime) -> list[Change]:
        """A telemetry message's values (one device), in the order the device sent them."""
        out: list[Change] = []
        device = self.rules.for_device(device_id)
        if device.by_metric:
            for _d, metric, ts, value, _text in rows:
                rules = device.by_metric.get(metric)
                if not rules or value is None:
                    continue
                for rule in rules:
                    key = (rule.id, device_id)
                    state = self.state(key)
                    self.evaluated += 1
                    self._collect(
                        rule, device_id, state, engine.evaluate(rule, state, ts, value), out
                    )
                    if rule.raise_when is not None and rule.raise_when.op == "rate>":
                        self.dirty_rates.add(key)
        for rule in device.no_data:
            state = self.watch((rule.id, device_id))
            self._collect(
                rule, device_id, state, engine.evaluate(rule, state, received_at, None), out
            )
        return out

    def status(self, device_id: str, online: bool, at: datetime) -> list[Change]:
        out: list[Change] = []
        for rule in self.rules.for_device(device_id).no_data:
            state = self.watch((rule.id, device_id))
            self._collect(rule, device_id, state, engine.status(rule, state, online, at), out)
        return out

    def activity(
        self, rows: Iterable[tuple[str, datetime | None, bool | None, datetime | None]]
    ) -> list[Change]:
        """What the database knows of devices' activity (written by ingest, so also what
        other replicas received): last seen, and the status with its time."""
        out: list[Change] = []
        if not self.rules.no_data:
            return out
        registry = self.rules.tags
        for device_id, last_seen, online, changed_at in rows:
            # Activity outlives the registry entry: a deleted device is not watched.
            if device_id not in registry:
                continue
            for rule in self.rules.for_device(device_id).no_data:
                state = self.watch((rule.id, device_id))
                if last_seen is not None and (state.last_ts is None or last_seen > state.last_ts):
                    self._collect(
                        rule, device_id, state, engine.evaluate(rule, state, last_seen, None), out
                    )
                if online is not None and changed_at is not None:
                    self._collect(
                        rule, device_id, state, engine.status(rule, state, online, changed_at), out
                    )
        return out

    def tick(self, now: datetime) -> list[Change]:
        """Timers that ran out with no reading: for_s, clear delays, no_data timeouts."""
        out: list[Change] = []
        for key in list(self.timed):
            rule = self.rules.rules.get(key[0])
            state = self.states.get(key)
            if rule is None or state is None:
                self.timed.discard(key)
                continue
            self._collect(rule, key[1], state, engine.advance(rule, state, now), out)
        for key in list(self.watched):
            rule = self.rules.rules.get(key[0])
            state = self.states.get(key)
            if rule is None or state is None or key[1] not in self.rules.tags:
                self.watched.discard(key)  # rule or device gone (deleted from the registry)
                continue
            self._collect(rule, key[1], state, engine.advance(rule, state, now), out)
        return out

    def reset(self, rule_id: int, device_id: str, at: datetime) -> None:
        """The alarm was cleared by hand (or is gone): start over."""
        rule = self.rules.rules.get(rule_id)
        state = self.states.get((rule_id, device_id))
        if rule is None or state is None:
            return
        engine.reset(rule, state, at)
        self.dirty.discard((rule_id, device_id))
        if state.phase in _TIMED:
            self.timed.add((rule_id, device_id))
        else:
            self.timed.discard((rule_id, device_id))

    def replace_rules(self, rules: RuleSet, states: Mapping[Key, State], changed: set[int]) -> None:
        """New rule set: states of removed or changed rules are dropped, and those of
        changed rules replaced by ``states`` (read back from the database)."""
        self.rules = rules
        for key in [k for k in self.states if k[0] not in rules.rules or k[0] in changed]:
            del self.states[key]
            self.timed.discard(key)
            self.watched.discard(key)
            self.dirty.discard(key)
            self.dirty_rates.discard(key)
        for key, state in states.items():
            if key[0] in rules.rules:
                self.states[key] = state
                if state.phase in _TIMED:
                    self.timed.add(key)
                if rules.rules[key[0]].kind == "no_data":
                    self.watched.add(key)
