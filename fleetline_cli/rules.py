"""``fleetline rule``, ``alarm``, ``route`` and ``dead-letters``: what is done with the
readings the devices send, over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY).

A rule or a route is written as the API takes it (``/v1/rules``, ``/v1/routes``), in a
JSON or YAML file, or on standard input (``-``)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    api_items,
    compact,
    print_table,
    printed,
    read_document,
)

rule_app = typer.Typer(
    help="Rules: alarms raised and cleared on the readings (and actions they run).",
    no_args_is_help=True,
)
alarm_app = typer.Typer(
    help="Alarms the rules raised: list, acknowledge, clear.", no_args_is_help=True
)
route_app = typer.Typer(
    help="Message routes: readings forwarded to a webhook or an MQTT topic.", no_args_is_help=True
)
dead_letters_app = typer.Typer(
    help="Device messages ingest could not store, with the reason.", no_args_is_help=True
)

RuleId = Annotated[int, typer.Argument(help="The rule's id.")]
AlarmId = Annotated[int, typer.Argument(help="The alarm's id.")]
RouteId = Annotated[int, typer.Argument(help="The route's id.")]
BodyFile = Annotated[
    str,
    typer.Option(
        "--file", "-f", help="The body as the API takes it: a JSON or YAML file, - for stdin."
    ),
]
# What the API adds to a rule; the rest is its body, as PUT takes it back.
RULE_READ_ONLY = ("id", "version", "created_at", "updated_at")


def _body(source: str) -> dict[str, Any]:
    doc = read_document(source, "--file")
    if not isinstance(doc, dict):
        raise typer.BadParameter("the body is an object (name: ..., ...)", param_hint="--file")
    return doc


def _condition(metric: str | None, cond: dict[str, Any] | None) -> str | None:
    if not cond:
        return None
    if cond["op"] == "outside":
        text = f"{metric} outside [{cond['low']:g}, {cond['high']:g}]"
    else:
        text = f"{metric} {cond['op']} {cond['value']:g}"
    return text + (f" for {cond['for_s']:g} s" if cond.get("for_s") else "")


def _trigger(rule: dict[str, Any]) -> str | None:
    if rule["kind"] == "no_data":
        return f"no data for {rule['timeout_s']:g} s"
    return _condition(rule["metric"], rule["raise"])


def _matches(match: dict[str, Any]) -> str:
    parts = [*match.get("devices", []), *(f"{k}={v}" for k, v in match.get("tags", {}).items())]
    return " ".join(parts) or "every device"


def _show_rule(rule: dict[str, Any]) -> None:
    state = "enabled" if rule["enabled"] else "disabled"
    typer.echo(
        f"rule {rule['id']} {rule['name']!r} (v{rule['version']}, {state}, {rule['severity']})"
    )
    typer.echo(f"  raise: {_trigger(rule)}")
    if rule.get("clear"):
        typer.echo(f"  clear: {_condition(rule['metric'], rule['clear'])}")
    typer.echo(f"  devices: {_matches(rule['match'])}")
    typer.echo(f"  message: {rule['message']}")
    for action in rule["actions"]:
        where = action.get("url") or action.get("device") or action.get("method") or ""
        on = ",".join(action.get("on", []))
        typer.echo(f"  action: {action['type']} {where} on {on}".rstrip())


def _rule_body(rule: dict[str, Any]) -> dict[str, Any]:
    """A rule as the API shows it, as PUT takes it back (masked secrets keep theirs)."""
    return {k: v for k, v in rule.items() if k not in RULE_READ_ONLY and v is not None}


@rule_app.command("list")
def rule_list(output: OutputOption = Output.table, as_json: JsonOption = False) -> None:
    """Rules by id."""
    rules = api_items("/v1/rules")
    if printed(rules, output, as_json):
        return
    print_table(
        ["id", "name", "raise", "clear", "severity", "enabled", "devices"],
        [
            [
                r["id"],
                r["name"],
                _trigger(r),
                _condition(r["metric"], r.get("clear")),
                r["severity"],
                ("yes", "green") if r["enabled"] else ("no", "dim"),
                _matches(r["match"]),
            ]
            for r in rules
        ],
    )


@rule_app.command("show")
def rule_show(
    rule_id: RuleId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """One rule (secrets masked)."""
    rule = api("GET", f"/v1/rules/{rule_id}")
    if not printed(rule, output, as_json):
        _show_rule(rule)


@rule_app.command("create")
def rule_create(
    body: BodyFile, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Create a rule from its body (docs/protocol.md, section 15); the rules service
    evaluates it from the next reading on."""
    rule = api("POST", "/v1/rules", json=_body(body))
    if not printed(rule, output, as_json):
        _show_rule(rule)


@rule_app.command("update")
def rule_update(
    rule_id: RuleId,
    body: Annotated[
        str | None,
        typer.Option("--file", "-f", help="The whole new body: a JSON or YAML file, - for stdin."),
    ] = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Only switch it on or off.")
    ] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Replace a rule's body (--file), or switch it on or off. Its timers restart; a
    secret given back as ******** keeps the stored one."""
    if (body is None) == (enabled is None):
        raise typer.BadParameter("give --file, or --enable or --disable")
    if body is not None:
        new = _body(body)
    else:
        new = _rule_body(api("GET", f"/v1/rules/{rule_id}")) | {"enabled": enabled}
    rule = api("PUT", f"/v1/rules/{rule_id}", json=new)
    if not printed(rule, output, as_json):
        _show_rule(rule)


@rule_app.command("delete")
def rule_delete(rule_id: RuleId) -> None:
    """Delete a rule; its open alarms are cleared."""
    api("DELETE", f"/v1/rules/{rule_id}")
    typer.echo(f"deleted rule {rule_id}")


@rule_app.command("backtest")
def rule_backtest(
    rule_id: RuleId,
    start: Annotated[
        str | None, typer.Option("--from", help="RFC 3339, with offset (default: to - 24 h).")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="RFC 3339, with offset (default: now).")
    ] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """The alarms the rule would have raised on the stored readings of a time range
    (nothing is stored, no action runs)."""
    params = {k: v for k, v in (("from", start), ("to", end)) if v}
    result = api("POST", f"/v1/rules/{rule_id}/backtest", params=params)
    if printed(result, output, as_json):
        return
    typer.echo(
        f"rule {rule_id} on {result['readings']} readings from {result['from']} to "
        f"{result['to']}: {len(result['alarms'])} alarm(s)",
        err=True,
    )
    print_table(
        ["device", "raised", "cleared", "value", "peak", "count", "message"],
        [
            [
                a["device_id"],
                a["raised_at"],
                a["cleared_at"],
                a["value"],
                a["peak"],
                a["count"],
                a["message"],
            ]
            for a in result["alarms"]
        ],
    )


def _alarm_line(a: dict[str, Any]) -> str:
    return (
        f"alarm {a['id']} ({a['severity']}, rule {a['rule_id']} {a['rule_name']!r}) on "
        f"{a['device_id']}: {a['state']}, {a['message']}"
    )


@alarm_app.command("list")
def alarm_list(
    state: Annotated[str | None, typer.Option(help="active, acknowledged or cleared")] = None,
    device: Annotated[str | None, typer.Option(help="Only this device's.")] = None,
    rule: Annotated[int | None, typer.Option(help="Only this rule's.")] = None,
    severity: Annotated[
        str | None, typer.Option(help="critical, major, minor, warning or info")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many, at most.")] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Alarms, newest first."""
    alarms = api_items(
        "/v1/alarms",
        at_most=limit,
        state=state,
        device_id=device,
        rule_id=rule,
        severity=severity,
    )
    if printed(alarms, output, as_json):
        return
    styles = {"active": "red", "acknowledged": "yellow", "cleared": "dim"}
    print_table(
        ["id", "state", "severity", "device", "rule", "value", "raised", "message"],
        [
            [
                a["id"],
                (a["state"], styles.get(a["state"], "")),
                a["severity"],
                a["device_id"],
                a["rule_name"],
                a["value"],
                a["raised_at"],
                a["message"],
            ]
            for a in alarms
        ],
    )


@alarm_app.command("show")
def alarm_show(
    alarm_id: AlarmId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """One alarm and its history: raised, acknowledged, cleared, and by whom."""
    alarm = api("GET", f"/v1/alarms/{alarm_id}")
    history = api("GET", f"/v1/alarms/{alarm_id}/history")
    if printed({**alarm, "history": history}, output, as_json):
        return
    typer.echo(_alarm_line(alarm))
    typer.echo(f"  value {alarm['value']}, peak {alarm['peak']}, {alarm['count']} reading(s)")
    for e in history:
        typer.echo(f"  {e['at']}  {e['event']:12}  by {e['actor'] or '-'}")


def _move(alarm_id: int, verb: str, output: Output, as_json: bool) -> None:
    alarm = api("POST", f"/v1/alarms/{alarm_id}/{verb}")
    if not printed(alarm, output, as_json):
        typer.echo(_alarm_line(alarm))


@alarm_app.command("ack")
def alarm_ack(
    alarm_id: AlarmId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Acknowledge an active alarm: it stays open until its rule clears it."""
    _move(alarm_id, "ack", output, as_json)


@alarm_app.command("clear")
def alarm_clear(
    alarm_id: AlarmId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Clear an alarm by hand; if the condition still holds, the rule raises a new one."""
    _move(alarm_id, "clear", output, as_json)


def _destination(d: dict[str, Any]) -> str:
    return f"mqtt {d['topic']}" if d["type"] == "mqtt" else f"webhook {d.get('url', '')}"


def _show_route(r: dict[str, Any]) -> None:
    state = "enabled" if r["enabled"] else "disabled"
    typer.echo(f"route {r['id']} {r['name']!r} (v{r['version']}, {state}): {r['source']}")
    typer.echo(f"  devices: {r['query'] or 'every device'}")
    if r["metric"]:
        typer.echo(f"  metric: {_condition(r['metric'], r['condition']) or r['metric']}")
    typer.echo(f"  to: {_destination(r['destination'])}")


@route_app.command("list")
def route_list(output: OutputOption = Output.table, as_json: JsonOption = False) -> None:
    """Message routes by id (secrets masked)."""
    routes = api_items("/v1/routes")
    if printed(routes, output, as_json):
        return
    print_table(
        ["id", "name", "enabled", "source", "devices", "metric", "to"],
        [
            [
                r["id"],
                r["name"],
                ("yes", "green") if r["enabled"] else ("no", "dim"),
                r["source"],
                r["query"] or "every device",
                _condition(r["metric"], r["condition"]) or r["metric"],
                _destination(r["destination"]),
            ]
            for r in routes
        ],
    )


@route_app.command("show")
def route_show(
    route_id: RouteId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """One route and its latest deliveries."""
    route = api("GET", f"/v1/routes/{route_id}")
    deliveries = api("GET", f"/v1/routes/{route_id}/deliveries", params={"limit": 10})["items"]
    if printed({**route, "deliveries": deliveries}, output, as_json):
        return
    _show_route(route)
    for d in deliveries:
        error = f" {d['last_error']}" if d["last_error"] else ""
        typer.echo(
            f"  {d['created_at']}  {d['device_id']}  {d['status']} after {d['attempts']} "
            f"attempt(s){error}  {compact(d['values'], 60)}"
        )


@route_app.command("create")
def route_create(
    body: BodyFile, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Create a route from its body (name, query, metric, condition, destination)."""
    route = api("POST", "/v1/routes", json=_body(body))
    if not printed(route, output, as_json):
        _show_route(route)


@route_app.command("update")
def route_update(
    route_id: RouteId,
    body: BodyFile,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Replace a route's body; a secret given back as ******** keeps the stored one."""
    route = api("PUT", f"/v1/routes/{route_id}", json=_body(body))
    if not printed(route, output, as_json):
        _show_route(route)


@route_app.command("delete")
def route_delete(route_id: RouteId) -> None:
    """Delete a route; its deliveries still waiting are dropped."""
    api("DELETE", f"/v1/routes/{route_id}")
    typer.echo(f"deleted route {route_id}")


@dead_letters_app.command("list")
def dead_letters_list(
    device: Annotated[str | None, typer.Option(help="Only this device's.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many, at most.")] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Messages ingest could not store, newest first, with the reason and the start of
    the payload."""
    items = api_items("/v1/dead-letters", at_most=limit, device_id=device)
    if printed(items, output, as_json):
        return
    print_table(
        ["id", "received", "device", "topic", "reason", "bytes", "payload"],
        [
            [
                d["id"],
                d["received_at"],
                d["device_id"],
                d["topic"],
                d["reason"],
                d["payload_size"],
                d["payload_text"][:40].replace("\n", " "),
            ]
            for d in items
        ],
    )
