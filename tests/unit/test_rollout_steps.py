"""How a rollout device moves on what it reports (workers/jobs/rollouts.py), and the
time window."""

from __future__ import annotations

from datetime import UTC, datetime

from fleetline_api.schemas.rollouts import Window
from fleetline_api.workers.jobs.rollouts import Step, advance, in_window, window_opens

TIMEOUTS = {"notified": 60, "downloading": 60, "rebooting": 60}


def step(phase: str, report: object, *, in_phase: float = 1, progress: int | None = None,
         job: int = 7) -> Step | None:
    return advance(job, phase, progress, report, "2.0.0", in_phase, TIMEOUTS)


def test_reports_of_this_rollout_move_the_device_forward() -> None:
    assert step("notified", {"rollout": 7, "state": "downloading", "progress": 30}) == Step(
        "downloading", 30, "running")
    assert step("downloading", {"rollout": 7, "state": "downloading", "progress": 30},
                progress=30) is None
    assert step("downloading", {"rollout": 7, "state": "applying"}, progress=90) == Step(
        "applying", None, "running")
    assert step("rebooting", {"rollout": 7, "state": "succeeded", "running": "2.0.0"}) == Step(
        "succeeded", None, "succeeded", "updated")
    assert step("applying", {"rollout": 7, "state": "failed", "reason": "flash"}) == Step(
        "failed", None, "failed", "device", "flash")
    assert step("rebooting", {"rollout": 7, "state": "rolled_back"}) == Step(
        "rolled_back", None, "rolled_back", "rolled_back", "the device gave no reason")


def test_what_cannot_be_taken_is_refused_and_changes_nothing() -> None:
    assert step("applying", {"rollout": 7, "state": "downloading"}).refused == (  # type: ignore[union-attr]
        "downloading after applying")
    assert step("notified", {"rollout": 7, "state": "exploded"}).refused == (  # type: ignore[union-attr]
        "unknown state 'exploded'")
    refused = step("rebooting", {"rollout": 7, "state": "succeeded", "running": "1.0"})
    assert refused == Step("rebooting", None, "running", refused="succeeded, running '1.0'")
    # Other rollouts' reports, and anything that is not a report, are not this one's.
    for report in ({"rollout": 6, "state": "failed"}, None, "text", [1], {"state": "failed"}):
        assert step("notified", report) is None
    # A bad progress is not taken, the phase is.
    assert step("notified", {"rollout": 7, "state": "downloading", "progress": 900}) == Step(
        "downloading", None, "running")


def test_a_phase_past_its_timeout_fails_unless_the_device_moved_on() -> None:
    late = step("downloading", None, in_phase=61, progress=40)
    assert late == Step("downloading", 40, "failed", "timeout",
                        "no report past downloading within 60 s")
    assert step("downloading", {"rollout": 7, "state": "verifying"}, in_phase=61) == Step(
        "verifying", None, "running")
    refused_late = step("downloading", {"rollout": 7, "state": "notified"}, in_phase=61)
    assert refused_late is not None and refused_late.state == "failed"
    assert refused_late.refused == "notified after downloading"
    assert step("verifying", None, in_phase=10**6) is None  # no timeout set for it


def test_the_window_spans_midnight_when_it_ends_before_it_starts() -> None:
    night = Window(start="22:00", end="04:30")
    day = Window(start="09:00", end="17:00")
    at = lambda h, m: datetime(2026, 12, 6, h, m, tzinfo=UTC)  # noqa: E731
    assert in_window(at(23, 0), night) and in_window(at(4, 29), night)
    assert not in_window(at(4, 30), night) and not in_window(at(12, 0), night)
    assert in_window(at(9, 0), day) and not in_window(at(17, 0), day)
    assert window_opens(at(12, 0), night) == at(22, 0)
    assert window_opens(at(18, 0), day) == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
