"""The command line against the running API and database, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import ApiProcess

pytestmark = pytest.mark.integration


def fleetline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetline", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


async def test_device_verbs_and_telemetry_query(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")}
    made = fleetline("device", "create", f"{uid}-c", "--tag", f"site={uid}", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["tags"] == {"site": uid}
    again = fleetline("device", "create", f"{uid}-c", env=env)
    assert again.returncode == 1 and "409 Conflict" in again.stderr
    listed = fleetline("device", "list", "--tag", f"site={uid}", "--json", env=env)
    assert [d["id"] for d in json.loads(listed.stdout)] == [f"{uid}-c"]
    shown = fleetline("device", "show", f"{uid}-c", env=env)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{uid}-c")
    query = fleetline("telemetry", "query", f"{uid}-c", "--bucket", "1h", "--json", env=env)
    assert query.returncode == 0 and json.loads(query.stdout) == []
    bad = fleetline("telemetry", "query", f"{uid}-c", "--from", "yesterday", env=env)
    assert bad.returncode == 1 and "422" in bad.stderr
    assert fleetline("device", "delete", f"{uid}-c", env=env).returncode == 0
    gone = fleetline("device", "show", f"{uid}-c", env=env)
    assert gone.returncode == 1 and "404 Not Found" in gone.stderr


def test_missing_key_and_unreachable_api_are_clear_errors() -> None:
    no_key = fleetline("device", "list", env={"FLEETLINE_API_KEY": ""})
    assert no_key.returncode == 1 and "set FLEETLINE_API_KEY" in no_key.stderr
    down = fleetline("device", "list",
                     env={"FLEETLINE_API_KEY": "flk_x", "FLEETLINE_API_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "cannot reach the API" in down.stderr
