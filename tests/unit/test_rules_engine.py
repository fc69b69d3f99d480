"""The rule state machine (fleetline/rules_engine.py): durations, hysteresis, clear delay,
rate, outside, no_data, and the backtest replay built on the same code."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetline.rules_engine import (
    Condition,
    Event,
    Phase,
    Rule,
    RuleDefinitionError,
    State,
    advance,
    evaluate,
    render,
    replay,
    reset,
    status,
)

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rule(**doc: Any) -> Rule:
    row: dict[str, Any] = {
        "id": 1,
        "name": "hot",
        "kind": "threshold",
        "metric": "temp",
        "raise_condition": {"op": ">", "value": 30, "for_s": 10},
        "clear_condition": {"op": "<", "value": 28, "for_s": 5},
        "severity": "major",
        "message": "{device_id} at {value} C",
        "match": {},
    }
    row.update(doc)
    return Rule.from_row(row)


def feed(r: Rule, state: State, points: Sequence[tuple[float, float]]) -> list[tuple[str, float]]:
    """(event, seconds) of every transition the readings cause."""
    out = []
    for seconds, value in points:
        for t in evaluate(r, state, at(seconds), value):
            out.append((t.event.value, (t.at - T0).total_seconds()))
    return out


def no_updates(events: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [e for e in events if e[0] != "updated"]


def test_an_alarm_raises_only_after_the_condition_held_for_its_duration() -> None:
    r, s = rule(), State()
    events = feed(r, s, [(0, 31), (4, 32), (9, 33)])
    assert events == [("pending", 0)]
    assert s.phase is Phase.PENDING
    events = feed(r, s, [(10, 34)])
    # Raised when it became due (0 + 10 s), before the reading at 10 s updates it.
    assert no_updates(events) == [("raised", 10)]
    assert s.phase is Phase.ACTIVE and s.count == 4 and s.peak == 34 and s.value == 34


def test_a_condition_that_breaks_before_its_duration_raises_nothing() -> None:
    r, s = rule(), State()
    events = feed(r, s, [(0, 31), (5, 29), (8, 31), (17, 31)])
    assert events == [("pending", 0), ("cancelled", 5), ("pending", 8)]
    assert advance(r, s, at(17.9)) == []
    raised = advance(r, s, at(18))
    assert [(t.event, t.at) for t in raised] == [(Event.RAISED, at(18))]


def test_the_ticker_raises_a_quiet_device_when_the_duration_passes() -> None:
    r, s = rule(), State()
    feed(r, s, [(0, 40)])
    assert advance(r, s, at(9.99)) == []
    (t,) = advance(r, s, at(25))
    # Dated when due, whenever the tick came.
    assert t.event is Event.RAISED and t.at == at(10) and t.value == 40 and t.count == 1


def test_values_dancing_around_the_threshold_do_not_flap_with_hysteresis() -> None:
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 0}), State()
    wobble = [(i, 30.5 if i % 2 else 29.5) for i in range(40)]
    events = no_updates(feed(r, s, wobble))
    # Raised once at the first value over 30; 29.5 is inside the band (not < 28).
    assert events == [("raised", 1)]
    assert s.phase is Phase.ACTIVE and s.count == 20


def test_without_hysteresis_the_same_values_flap() -> None:
    # The control for the test above: a clear of "not raise" follows every crossing.
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 0}, clear_condition=None), State()
    events = no_updates(feed(r, s, [(i, 30.5 if i % 2 else 29.5) for i in range(10)]))
    assert [e for e, _ in events].count("raised") == 5


def test_the_alarm_clears_only_after_the_clear_condition_held_for_the_clear_delay() -> None:
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 0}), State()
    feed(r, s, [(0, 35)])
    events = no_updates(feed(r, s, [(1, 27), (3, 29), (4, 27), (6, 26)]))
    # 27 starts the delay, 29 (the band) ends it, 27 starts it again.
    assert events == [("clearing", 1), ("resumed", 3), ("clearing", 4)]
    assert advance(r, s, at(8.9)) == []
    (t,) = advance(r, s, at(9))
    assert t.event is Event.CLEARED and t.at == at(9) and t.value == 26 and t.peak == 35
    assert s.phase is Phase.IDLE


def test_a_new_episode_after_a_clear_starts_counting_again() -> None:
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 0}, clear_condition=None), State()
    feed(r, s, [(0, 35), (1, 36), (2, 20), (3, 31)])
    assert s.phase is Phase.ACTIVE and s.count == 1 and s.peak == 31


def test_default_clear_is_not_raise_immediately() -> None:
    r, s = (
        rule(clear_condition=None, raise_condition={"op": ">=", "value": 30, "for_s": 0}),
        State(),
    )
    assert no_updates(feed(r, s, [(0, 30), (1, 29.9)])) == [("raised", 0), ("cleared", 1)]


@pytest.mark.parametrize(
    ("cond", "value", "expected"),
    [
        ({"op": ">", "value": 1}, 1, False),
        ({"op": ">=", "value": 1}, 1, True),
        ({"op": "<", "value": 1}, 1, False),
        ({"op": "<=", "value": 1}, 1, True),
        ({"op": "==", "value": 1}, 1, True),
        ({"op": "!=", "value": 1}, 1, False),
        ({"op": "outside", "low": 0, "high": 10}, 10, False),
        ({"op": "outside", "low": 0, "high": 10}, 10.01, True),
        ({"op": "outside", "low": 0, "high": 10}, -0.01, True),
    ],
)
def test_operators(cond: dict[str, Any], value: float, expected: bool) -> None:
    assert Condition.from_doc(cond).holds(value, None) is expected


def test_outside_peak_is_the_value_furthest_out_of_range() -> None:
    r = rule(
        raise_condition={"op": "outside", "low": 0, "high": 10, "for_s": 0}, clear_condition=None
    )
    s = State()
    feed(r, s, [(0, 12), (1, -5), (2, 14), (3, 5)])
    assert s.phase is Phase.IDLE
    alarms = replay(r, [("d", at(i), v) for i, v in enumerate([12, -5, 14, 5])], at(10))
    assert len(alarms) == 1 and alarms[0].peak == -5 and alarms[0].count == 3


def test_rate_uses_the_previous_value_and_time() -> None:
    r = rule(raise_condition={"op": "rate>", "value": 2, "for_s": 0}, clear_condition=None)
    s = State()
    # +1/s, then +10 over 2 s (5/s: raises), then +1 over 1 s (clears).
    events = no_updates(feed(r, s, [(0, 0), (1, 1), (3, 11), (4, 12)]))
    assert events == [("raised", 3), ("cleared", 4)]


def test_older_and_repeated_readings_are_skipped() -> None:
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 0}), State()
    feed(r, s, [(5, 35)])
    assert feed(r, s, [(5, 35), (4, 99)]) == []
    assert s.count == 1 and s.peak == 35


def test_no_data_raises_after_the_timeout_and_clears_on_the_next_reading() -> None:
    r = rule(kind="no_data", metric=None, raise_condition=None, clear_condition=None, timeout_s=120)
    s = State()
    evaluate(r, s, at(0), None)
    assert advance(r, s, at(119)) == []
    (t,) = advance(r, s, at(130))
    assert t.event is Event.RAISED and t.at == at(120)
    assert advance(r, s, at(500)) == []  # still one alarm
    (c,) = evaluate(r, s, at(501), None)
    assert c.event is Event.CLEARED and c.at == at(501)


def test_no_data_raises_at_once_on_an_offline_status_and_clears_on_online() -> None:
    r = rule(kind="no_data", metric=None, raise_condition=None, clear_condition=None, timeout_s=120)
    s = State()
    evaluate(r, s, at(0), None)
    (t,) = status(r, s, False, at(3))
    assert t.event is Event.RAISED and t.at == at(3)
    assert status(r, s, False, at(3)) == []  # the same status again
    assert advance(r, s, at(1000)) == []
    (c,) = status(r, s, True, at(1001))
    assert c.event is Event.CLEARED


def test_an_offline_status_older_than_the_last_reading_is_ignored() -> None:
    r = rule(kind="no_data", metric=None, raise_condition=None, clear_condition=None, timeout_s=120)
    s = State()
    evaluate(r, s, at(10), None)
    assert status(r, s, False, at(5)) == []


def test_a_manual_clear_re_arms_the_rule() -> None:
    r, s = rule(raise_condition={"op": ">", "value": 30, "for_s": 10}), State()
    feed(r, s, [(0, 40)])
    advance(r, s, at(10))
    assert s.phase is Phase.ACTIVE
    # Still hot when cleared: the condition holds from the clear on, and raises again
    # for_s later unless a reading says otherwise.
    reset(r, s, at(11))
    assert s.phase is Phase.PENDING and s.since == at(11)
    assert feed(r, s, [(12, 40)]) == []
    assert advance(r, s, at(20.9)) == []
    assert [(t.event, t.at) for t in advance(r, s, at(21))] == [(Event.RAISED, at(21))]
    reset(r, s, at(22))
    assert feed(r, s, [(23, 20)]) == [("cancelled", 23)]
    # Cooled down when cleared: nothing until the condition holds again.
    reset(r, s, at(24))
    assert s.phase is Phase.IDLE
    nd = rule(kind="no_data", metric=None, raise_condition=None, clear_condition=None, timeout_s=60)
    s2 = State()
    evaluate(nd, s2, at(0), None)
    advance(nd, s2, at(100))
    reset(nd, s2, at(100))
    assert advance(nd, s2, at(159)) == []
    assert [t.event for t in advance(nd, s2, at(160))] == [Event.RAISED]


def test_replay_gives_the_same_alarms_as_reading_by_reading_with_ticks() -> None:
    r = rule()
    points = [
        (i * 1.5, v)
        for i, v in enumerate(
            [25, 31, 32, 33, 29, 31, 31, 31, 31, 31, 31, 31, 31, 27, 27, 27, 27, 27, 26, 40]
        )
    ]
    live: list[tuple[str, float]] = []
    s = State()
    tick = 0.0
    for seconds, value in points:
        while tick < seconds:  # a ticker every 0.25 s between readings
            live += [(t.event.value, (t.at - T0).total_seconds()) for t in advance(r, s, at(tick))]
            tick += 0.25
        live += feed(r, s, [(seconds, value)])
    raised = [x for e, x in live if e == "raised"]
    cleared = [x for e, x in live if e == "cleared"]
    alarms = replay(r, [("d", at(x), v) for x, v in points], at(points[-1][0]))
    assert [(a.raised_at - T0).total_seconds() for a in alarms] == raised
    assert [(a.cleared_at - T0).total_seconds() for a in alarms if a.cleared_at] == cleared
    assert raised and cleared


def test_render_fills_known_fields_only() -> None:
    r = rule(message="{device_id} at {value} C ({count}x, peak {peak}) {unknown} {value.__class__}")
    assert (
        render(r, "d1", 31.5, 40.0, 3) == "d1 at 31.5 C (3x, peak 40) {unknown} {value.__class__}"
    )


def test_invalid_definitions_are_refused() -> None:
    with pytest.raises(RuleDefinitionError):
        Condition.from_doc({"op": "outside", "low": 1})
    with pytest.raises(RuleDefinitionError):
        Condition.from_doc({"op": "~", "value": 1})
    with pytest.raises(RuleDefinitionError):
        rule(kind="no_data", timeout_s=None, metric=None)


def test_match_by_device_list_or_tags() -> None:
    r = rule(match={"devices": ["a"], "tags": {"site": "A"}})
    assert r.matches("a", {})
    assert r.matches("b", {"site": "A", "x": 1})
    assert not r.matches("b", {"site": "B"})
    assert rule(match={}).matches("anything", {})
