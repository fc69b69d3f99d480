"""What the cloud tells one device: ``fleetline twin`` (desired and reported properties),
``fleetline method`` (direct methods), ``fleetline c2d`` (cloud-to-device messages) and
``fleetline module`` (the device's modules, each with a twin and methods of its own),
over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    api_items,
    compact,
    document_argument,
    print_table,
    printed,
)

twin_app = typer.Typer(
    help="Device twins: desired properties (set here) and reported ones (the device's).",
    no_args_is_help=True,
)
method_app = typer.Typer(
    help="Direct methods: call a device and wait for its answer.", no_args_is_help=True
)
c2d_app = typer.Typer(
    help="Cloud-to-device messages: a queue per device, each message with its history.",
    no_args_is_help=True,
)

module_app = typer.Typer(
    help="Modules of a device: named parts of its software, each with its own twin and "
    "methods (--module of `twin` and `method`).",
    no_args_is_help=True,
)

Module = Annotated[str | None, typer.Option(help="A module of the device, not the device.")]


def _base(device_id: str, module: str | None) -> str:
    return f"/v1/devices/{device_id}" + (f"/modules/{module}" if module else "")


def _document(doc: Any) -> str:
    return "\n".join("  " + line for line in json.dumps(doc, indent=2).splitlines())


def _show_twin(twin: dict[str, Any]) -> None:
    whose = twin["device_id"] + (f" module {twin['module_id']}" if twin.get("module_id") else "")
    tags = " ".join(f"{k}={v}" for k, v in sorted(twin["tags"].items()))
    typer.echo(f"twin of {whose}" + (f" (tags {tags})" if tags else ""))
    unpublished = twin["desired_published_version"] != twin["desired_version"]
    typer.echo(
        f'desired v{twin["desired_version"]} (etag "{twin["desired_version"]}"), '
        f"changed {twin['desired_updated_at'] or 'never'}"
        + (f"; published only v{twin['desired_published_version']}" if unpublished else "")
    )
    typer.echo(_document(twin["desired"]))
    typer.echo(
        f"reported v{twin['reported_version']}, changed {twin['reported_updated_at'] or 'never'}"
    )
    typer.echo(_document(twin["reported"]))
    typer.echo("delta (desired, not reported yet)" if twin["delta"] else "delta: none")
    if twin["delta"]:
        typer.echo(_document(twin["delta"]))


def _show_module(module: dict[str, Any]) -> None:
    typer.echo(
        f"module {module['module_id']} of {module['device_id']}, created {module['created_at']}"
    )


@module_app.command("list")
def module_list(
    device_id: str, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """A device's modules, by id."""
    modules = api("GET", f"/v1/devices/{device_id}/modules")["items"]
    if printed(modules, output, as_json):
        return
    print_table(["module", "created"], [[m["module_id"], m["created_at"]] for m in modules])


@module_app.command("create")
def module_create(
    device_id: str,
    module_id: Annotated[str, typer.Argument(help="Its id, unique within the device.")],
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Register a module of a device (one registered already is shown as it is).

    A module has no credentials of its own: it speaks over its device's connection."""
    module = api("PUT", f"/v1/devices/{device_id}/modules/{module_id}")
    if not printed(module, output, as_json):
        _show_module(module)


@module_app.command("show")
def module_show(
    device_id: str,
    module_id: str,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """One module (`twin show --module` gives its twin)."""
    module = api("GET", f"/v1/devices/{device_id}/modules/{module_id}")
    if not printed(module, output, as_json):
        _show_module(module)


@module_app.command("delete")
def module_delete(device_id: str, module_id: str) -> None:
    """Remove a module with its twin."""
    api("DELETE", f"/v1/devices/{device_id}/modules/{module_id}")
    typer.echo(f"deleted module {module_id} of {device_id}")


@twin_app.command("show")
def twin_show(
    device_id: str,
    module: Module = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """A device's twin: desired and reported properties, their versions, the delta."""
    twin = api("GET", f"{_base(device_id, module)}/twin")
    if not printed(twin, output, as_json):
        _show_twin(twin)


def _etag(text: str) -> str:
    """An If-Match value from a version (3) or an entity tag ("3", *)."""
    text = text.strip()
    return text if text == "*" or text.startswith(('"', "W/")) else f'"{text}"'


@twin_app.command("update")
def twin_update(
    device_id: str,
    desired: Annotated[
        str,
        typer.Option(
            help="A JSON merge patch of the desired properties, e.g. '{\"interval_s\": 10}' "
            "(null removes a member; @FILE or - reads JSON or YAML)."
        ),
    ],
    etag: Annotated[
        str | None,
        typer.Option(
            help="Apply only to this desired version (`twin show` gives it), else refuse."
        ),
    ] = None,
    module: Module = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Merge a patch into the desired properties; the device is sent the whole desired
    document. Without --etag the last writer wins."""
    patch = document_argument(desired, "--desired")
    if not isinstance(patch, dict):
        raise typer.BadParameter("must be a JSON object ({...})", param_hint="--desired")
    headers = {"Content-Type": "application/merge-patch+json"}
    if etag is not None:
        headers["If-Match"] = _etag(etag)
    twin = api(
        "PATCH", f"{_base(device_id, module)}/twin", content=json.dumps(patch), headers=headers
    )
    if not printed(twin, output, as_json):
        _show_twin(twin)


@method_app.command("invoke")
def method_invoke(
    device_id: str,
    name: Annotated[str, typer.Argument(help="The method, as the device knows it.")],
    params: Annotated[
        str, typer.Option(help="Its params, a JSON object (@FILE or - reads JSON or YAML).")
    ] = "{}",
    timeout: Annotated[
        int, typer.Option(min=1, max=300, help="Seconds the device has to answer.")
    ] = 30,
    module: Module = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Call a method on an online device and print its answer: its own status and payload."""
    call_params = document_argument(params, "--params")
    if not isinstance(call_params, dict):
        raise typer.BadParameter("must be a JSON object ({...})", param_hint="--params")
    result = api(
        "POST",
        f"{_base(device_id, module)}/methods/{name}",
        json={"params": call_params, "timeout_s": timeout},
        timeout=timeout + 15,
    )
    if printed(result, output, as_json):
        return
    typer.echo(f"status {result['status']}")
    typer.echo(_document(result["payload"]))


def _show_message(m: dict[str, Any], history: bool = False) -> None:
    typer.echo(
        f"message {m['id']} for {m['device_id']}: {m['state']}, sent {m['deliveries']} "
        f"time(s), expires {m['expires_at']}"
    )
    typer.echo(f"  body {compact(m['body'], 200)}")
    if m["properties"]:
        typer.echo("  properties " + " ".join(f"{k}={v}" for k, v in m["properties"].items()))
    if history:
        for e in m["history"]:
            typer.echo(f"  {e['at']}  {e['event']:9}  {e['detail'] or ''}".rstrip())


@c2d_app.command("send")
def c2d_send(
    device_id: str,
    body: Annotated[
        str, typer.Argument(help="JSON (@FILE or - reads JSON or YAML); --text: a string.")
    ],
    text: Annotated[bool, typer.Option(help="BODY is a string, not JSON.")] = False,
    prop: Annotated[
        list[str],
        typer.Option("--property", "-p", help="An application property name=value, repeatable."),
    ] = [],  # noqa: B006
    ttl: Annotated[
        int | None,
        typer.Option(help="Seconds before it expires undelivered (default: the API's, 1 h)."),
    ] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Queue a message for a device: it is sent when the device is online, again until
    the device acknowledges it or it expires."""
    pairs = [p.partition("=") for p in prop]
    if any(not sep for _k, sep, _v in pairs):
        raise typer.BadParameter("name=value", param_hint="--property")
    message: dict[str, Any] = {
        "body": body if text else document_argument(body, "BODY"),
        "properties": {k: v for k, _sep, v in pairs},
    }
    if ttl is not None:
        message["ttl_s"] = ttl
    sent = api("POST", f"/v1/devices/{device_id}/messages", json=message)
    if not printed(sent, output, as_json):
        _show_message(sent)


@c2d_app.command("list")
def c2d_list(
    device_id: str,
    state: Annotated[
        str | None,
        typer.Option(help="queued, sent, completed, rejected, expired or cancelled"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many, at most.")] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """A device's messages, newest first, with their states."""
    items = api_items(f"/v1/devices/{device_id}/messages", at_most=limit, state=state)
    if printed(items, output, as_json):
        return
    print_table(
        ["id", "state", "sent", "created", "expires", "finished", "body"],
        [
            [
                m["id"],
                m["state"],
                m["deliveries"],
                m["created_at"],
                m["expires_at"],
                m["finished_at"],
                compact(m["body"], 40),
            ]
            for m in items
        ],
    )


@c2d_app.command("show")
def c2d_show(
    device_id: str,
    message_id: str,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """One message, with its history."""
    m = api("GET", f"/v1/devices/{device_id}/messages/{message_id}")
    if not printed(m, output, as_json):
        _show_message(m, history=True)


@c2d_app.command("cancel")
def c2d_cancel(
    device_id: str,
    message_id: str,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Cancel a queued or sent message: it is not sent (again)."""
    m = api("POST", f"/v1/devices/{device_id}/messages/{message_id}/cancel")
    if not printed(m, output, as_json):
        _show_message(m)
