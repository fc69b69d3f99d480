"""The command line's rule, alarm, route and dead-letters verbs against the running API;
bodies from YAML and JSON files and stdin, the -o forms; in-process (typer's runner)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from tests.integration.test_cli_cloud import Cli, failed, ok, runner_for
from tests.support import ApiProcess

pytestmark = pytest.mark.integration


@pytest.fixture
async def cli(api: ApiProcess, make_key: Callable[..., Any]) -> Cli:
    return runner_for({"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")})


RULE_YAML = """\
# YAML 1.1 would read `on` as true: the command line keeps it a name.
name: {uid} too warm
match:
  devices: [{device}]
metric: temp
raise: {{op: ">", value: 30, for_s: 0}}
clear: {{op: "<", value: 25}}
severity: critical
message: "{{device_id}} at {{value}}"
actions:
  - type: webhook
    url: https://example.org/hooks/{uid}
    secret: s3cret
    on: [raised, cleared]
"""


async def readings(db: asyncpg.Pool[Any], device: str, values: list[float]) -> datetime:
    """Stored readings of ``temp``, a minute apart, ending a minute ago; the first's time."""
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    series = await db.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, 'temp') RETURNING id", device)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=len(values))
    await db.executemany(
        "INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, $3)",
        [(series, start + timedelta(minutes=i), v) for i, v in enumerate(values)])
    return start


async def test_rules_from_yaml_shown_switched_backtested_and_deleted(
    cli: Cli, db: asyncpg.Pool[Any], uid: str, tmp_path: Path
) -> None:
    device = f"{uid}-d"
    start = await readings(db, device, [20, 31, 33, 24, 20])
    (tmp_path / "rule.yaml").write_text(RULE_YAML.format(uid=uid, device=device))
    made = ok(cli("rule", "create", "--file", str(tmp_path / "rule.yaml"), "-o", "json"))
    rule = json.loads(made.stdout)
    assert rule["actions"] == [{"type": "webhook", "url": f"https://example.org/hooks/{uid}",
                                "secret": "********", "on": ["raised", "cleared"]}]
    assert rule["raise"] == {"op": ">", "value": 30, "for_s": 0} and rule["enabled"]
    rid = str(rule["id"])
    shown = ok(cli("rule", "show", rid)).stdout.splitlines()
    assert shown[0] == f"rule {rid} '{uid} too warm' (v1, enabled, critical)"
    assert shown[1:4] == ["  raise: temp > 30", "  clear: temp < 25", f"  devices: {device}"]
    listed = ok(cli("rule", "list")).stdout.splitlines()
    assert listed[0].split() == ["id", "name", "raise", "clear", "severity", "enabled", "devices"]
    assert any(line.split()[0] == rid and "temp > 30" in line for line in listed[1:])
    # Switched off: the rest of the rule (and its masked secret) stays as it was.
    off = json.loads(ok(cli("rule", "update", rid, "--disable", "--json")).stdout)
    assert not off["enabled"] and off["version"] == 2 and off["actions"] == rule["actions"]
    # A new body from stdin, as JSON; the secret given back masked keeps the stored one.
    body = {k: rule[k] for k in ("name", "match", "metric", "raise", "severity", "actions")}
    body["raise"] = {"op": ">", "value": 32}
    replaced = yaml.safe_load(ok(cli("rule", "update", rid, "--file", "-", "-o", "yaml",
                                     stdin=json.dumps(body))).stdout)
    assert replaced["raise"] == {"op": ">", "value": 32.0, "for_s": 0.0}
    assert replaced["clear"] is None and replaced["version"] == 3
    # The backtest: the readings over 32 raise one alarm, cleared when they drop.
    frm = (start - timedelta(seconds=1)).isoformat()
    result = json.loads(ok(cli("rule", "backtest", rid, "--from", frm, "--json")).stdout)
    assert result["readings"] == 5
    assert [(a["device_id"], a["peak"], a["cleared_at"] is not None)
            for a in result["alarms"]] == [(device, 33.0, True)]
    table = ok(cli("rule", "backtest", rid, "--from", frm))
    assert "on 5 readings" in table.stderr and "1 alarm(s)" in table.stderr
    assert table.stdout.splitlines()[1].split()[0] == device
    bad = cli("rule", "create", "--file", "-", stdin="name: [unclosed\n")
    assert bad.exit_code == 2 and "neither JSON nor YAML" in bad.stderr
    failed(cli("rule", "create", "--file", "-", stdin="name: x\nmetric: temp\n"),
           "422", "raise")
    ok(cli("rule", "delete", rid))
    failed(cli("rule", "show", rid), "404 Not Found", f"rule {rid} not found")


async def test_alarms_listed_acknowledged_and_cleared(
    cli: Cli, db: asyncpg.Pool[Any], uid: str
) -> None:
    device = f"{uid}-a"
    alarm_id = await db.fetchval(
        "INSERT INTO rule_alarms (rule_id, rule_name, device_id, metric, severity, state, "
        "raised_at, value, peak, message) VALUES (999999, $1, $2, 'temp', 'major', 'active', "
        "now(), 31, 33, 'too warm') RETURNING id", f"{uid} rule", device)
    await db.execute("INSERT INTO alarm_events (alarm_id, at, event, actor, value) "
                     "VALUES ($1, now(), 'raised', 'rules', 31)", alarm_id)
    listed = ok(cli("alarm", "list", "--device", device)).stdout.splitlines()
    assert listed[0].split() == ["id", "state", "severity", "device", "rule", "value", "raised",
                                 "message"]
    assert listed[1].split()[:4] == [str(alarm_id), "active", "major", device]
    acked = ok(cli("alarm", "ack", str(alarm_id))).stdout
    assert acked.startswith(f"alarm {alarm_id} (major, rule 999999 '{uid} rule') on {device}: "
                            "acknowledged")
    failed(cli("alarm", "ack", str(alarm_id)), "409 Conflict", "only active alarms")
    cleared = json.loads(ok(cli("alarm", "clear", str(alarm_id), "--json")).stdout)
    assert cleared["state"] == "cleared" and cleared["cleared_by"]
    shown = yaml.safe_load(ok(cli("alarm", "show", str(alarm_id), "-o", "yaml")).stdout)
    assert [e["event"] for e in shown["history"]] == ["raised", "acknowledged", "cleared"]
    text = ok(cli("alarm", "show", str(alarm_id))).stdout
    assert "value 31.0, peak 33.0" in text and "acknowledged  by" in text
    assert json.loads(ok(cli("alarm", "list", "--device", device, "--state", "active",
                             "--json")).stdout) == []


async def test_routes_and_dead_letters(cli: Cli, db: asyncpg.Pool[Any], uid: str,
                                       tmp_path: Path) -> None:
    (tmp_path / "route.json").write_text(json.dumps({
        "name": f"{uid} hot", "query": f"tags.site = '{uid}'", "metric": "temp",
        "condition": {"op": ">", "value": 30},
        "destination": {"type": "mqtt", "topic": f"out/{uid}"}}))
    route = json.loads(ok(cli("route", "create", "-f", str(tmp_path / "route.json"),
                              "--json")).stdout)
    assert route["destination"] == {"type": "mqtt", "topic": f"out/{uid}"}
    rid = str(route["id"])
    shown = ok(cli("route", "show", rid)).stdout.splitlines()
    assert shown == [f"route {rid} '{uid} hot' (v1, enabled): readings",
                     f"  devices: tags.site = '{uid}'", "  metric: temp > 30",
                     f"  to: mqtt out/{uid}"]
    as_yaml = yaml.safe_load(ok(cli("route", "show", rid, "-o", "yaml")).stdout)
    assert as_yaml["deliveries"] == [] and as_yaml["name"] == f"{uid} hot"
    listed = ok(cli("route", "list")).stdout.splitlines()
    assert listed[0].split() == ["id", "name", "enabled", "source", "devices", "metric", "to"]
    assert any(line.split()[0] == rid and f"mqtt out/{uid}" in line for line in listed[1:])
    failed(cli("route", "create", "-f", "-", stdin=json.dumps(
        {"name": "x", "destination": {"type": "mqtt", "topic": "devices/x"}})),
        "400 Bad Request", "under devices/")
    ok(cli("route", "delete", rid))
    failed(cli("route", "show", rid), "404")

    await db.execute(
        "INSERT INTO ingest_dead_letter (topic, device_id, reason, payload) VALUES "
        "($1, $2, 'not JSON', $3)", f"devices/{uid}-x/telemetry", f"{uid}-x", b"{nope")
    dead = ok(cli("dead-letters", "list", "--device", f"{uid}-x")).stdout.splitlines()
    assert dead[0].split() == ["id", "received", "device", "topic", "reason", "bytes", "payload"]
    assert dead[1].split()[2:] == [f"{uid}-x", f"devices/{uid}-x/telemetry", "not", "JSON", "5",
                                   "{nope"]
    [letter] = json.loads(ok(cli("dead-letters", "list", "--device", f"{uid}-x", "--limit", "1",
                                 "--json")).stdout)
    assert letter["reason"] == "not JSON" and letter["payload_text"] == "{nope"
