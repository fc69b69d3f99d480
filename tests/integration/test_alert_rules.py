"""deploy/prometheus/fleetline-alerts.yml: valid, behaving as its promtool unit tests say,
and naming only metrics a real ingest or API exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ApiProcess, IngestProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "fleetline-alerts.yml"
UNIT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # never skip: scripts/ensure-services.sh test installs it
        pytest.fail("promtool is not on PATH: run scripts/ensure-services.sh test "
                    "(Debian package prometheus)", pytrace=False)
    return path


def run(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_alert_rules_are_valid_and_fire_as_their_unit_tests_say() -> None:
    assert "8 rules found" in run("check", "rules", str(RULES))
    assert "SUCCESS" in run("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)


def test_every_metric_the_rules_name_is_exported_by_ingest_or_the_api(
    start_ingest: Callable[..., IngestProcess], api: ApiProcess
) -> None:
    named = set(re.findall(r"\bfleetline_[a-z_]+", RULES.read_text()))
    assert named >= {"fleetline_broker_dropped_messages", "fleetline_ingest_paused",
                     "fleetline_api_http_requests_total"}
    api._get("/v1/devices")  # a request answered (401), so its labelled series exist
    exported = start_ingest().metric_names() | api.metric_names()
    assert named <= exported, named - exported
