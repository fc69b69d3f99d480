"""The chaos suite's own logic (tests/chaos): its schedule replays from the seed, and its
checks fail on what they must catch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.chaos import invariants
from tests.chaos.faults import KINDS, Fault, schedule
from tests.chaos.fleet import HOT, NORMAL
from tests.chaos.workload import Answer, Record

T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def test_a_seed_gives_the_same_faults_and_every_kind_once_a_round() -> None:
    first, again, other = schedule(7, 2), schedule(7, 2), schedule(8, 2)
    assert [(f.at, f.kind, f.params) for f in first] == [
        (f.at, f.kind, f.params) for f in again]
    assert [f.kind for f in first] != [f.kind for f in other]
    for part in (first[: len(KINDS)], first[len(KINDS):]):
        assert sorted(f.kind for f in part) == sorted(KINDS)
    assert all(b.at > a.at for a, b in zip(first, first[1:], strict=False))


def test_a_missing_reading_is_a_crash_loss_only_in_the_window_before_a_broker_kill() -> None:
    kill_at = T0.timestamp() + 100
    crash = Fault(100, "broker kill -9", started=kill_at, ended=kill_at + 1)
    acked = {"d": [[ts(1), 20.0, T0.timestamp() + 1],      # stored
                   [ts(97), 20.0, kill_at - 3],             # missing, in the window
                   [ts(50), 20.0, T0.timestamp() + 50]]}    # missing, long before
    rows = [{"device_id": "d", "time": T0 + timedelta(seconds=1), "value": 20.0}]
    out = invariants.check_telemetry(acked, rows, [crash])
    assert (out.acked, out.stored, out.lost_in_crash) == (3, 1, 1)
    assert [lost[1] for lost in out.lost] == [ts(50)]
    assert invariants.missing(acked, rows) == {("d", invariants.epoch_ms(ts(97))),
                                               ("d", invariants.epoch_ms(ts(50)))}
    # Without the kill, both are losses; a value other than the one sent is counted.
    rows.append({"device_id": "d", "time": T0 + timedelta(seconds=97), "value": 1.0})
    out = invariants.check_telemetry(acked, rows, [])
    assert (len(out.lost), out.wrong_value) == (1, 1)


def test_a_device_silent_after_the_faults_is_named() -> None:
    acked = {"a": [[ts(1), 20.0, 10.0], [ts(2), 20.0, 200.0]], "b": [[ts(1), 20.0, 10.0]]}
    assert invariants.check_liveness(acked, ["a", "b", "c"], after=100.0) == ["b", "c"]


def test_each_hot_spell_wants_one_alarm_cleared_unless_still_hot() -> None:
    values = [NORMAL, HOT, HOT, NORMAL, HOT, NORMAL, NORMAL, HOT]
    rows = [{"device_id": "a-1", "time": T0 + timedelta(seconds=i), "value": v}
            for i, v in enumerate(values)]
    good = [{"device_id": "a-1", "state": s} for s in ("cleared", "cleared", "active")]
    out = invariants.check_alarms(rows, good)
    assert (out.spells, out.ended, out.raised, out.cleared, out.wrong) == (3, 2, 3, 2, [])
    doubled = [*good, {"device_id": "a-1", "state": "cleared"}]
    assert invariants.check_alarms(rows, doubled).wrong
    assert invariants.check_alarms(rows, good[:2]).wrong
    # An alarm for a device with no hot spell at all is wrong too.
    assert invariants.check_alarms(rows, [*good, {"device_id": "a-2", "state": "active"}]).wrong


def test_only_documented_answers_pass() -> None:
    pause = Fault(10, "database paused", started=1000.0, ended=1030.0)
    kill = Fault(50, "kill -9 api", started=3000.0, ended=3005.0)
    record = Record(answers=[
        Answer(1010.0, "GET", "/v1/devices", 503, 0.1),
        Answer(1040.0, "GET", "/v1/devices", 503, 0.1),   # within 15 s after it
        Answer(9.0, "POST", "/v1/devices/d/methods/ping", 504, 5.0),
        Answer(9.0, "POST", "/v1/devices/d/methods/ping", 409, 0.1),
        Answer(2000.0, "GET", "/v1/devices", 503, 0.1),   # no fault then
        Answer(1010.0, "GET", "/v1/devices", 500, 0.1),   # never
        Answer(9.0, "GET", "/v1/devices/d", 504, 5.0),    # not a method
        Answer(9.0, "GET", "/v1/devices/d/latest", 404, 0.1),  # not expected
    ], interrupted=[(3001.0, "POST a"), (4000.0, "POST b")])
    wrong: list[Any] = invariants.check_answers(record, [pause, kill])
    assert len(wrong) == 5, wrong
    assert sum(" 50" in w for w in wrong) == 3 and "404" in wrong[3] and "POST b" in wrong[4]
    record.unreachable = 1
    assert "neither API process" in invariants.check_answers(record, [pause, kill])[-1]
