"""The ``fleetline`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import asyncpg
import typer
from pydantic import ValidationError

from fleetline import apikeys
from fleetline.logs import setup_logging
from fleetline.settings import redact_url
from fleetline_cli.cloud import c2d_app, method_app, module_app, twin_app
from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api_errors,
    api_items,
    fail,
    print_table,
    printed,
)
from fleetline_cli.common import api as rest
from fleetline_cli.enrollments import ca_app, enrollment_app
from fleetline_cli.files import file_app
from fleetline_cli.jobs import job_app
from fleetline_cli.rollouts import rollout_app
from fleetline_cli.rules import alarm_app, dead_letters_app, route_app, rule_app

T = TypeVar("T")

app = typer.Typer(
    help="fleetline: an IoT fleet backend (MQTT ingest, REST API, rules) on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Commands that read no .fleetline/env: `up` writes it (a stale one must not become its
# configuration), and the services take their configuration from their environment only
# (a file in the folder a container starts in must not redirect its database).
NO_LOCAL_ENV = ("up", "ingest", "api", "rules")


@app.callback()
def _start(ctx: typer.Context) -> None:
    # The deployment `fleetline up` runs, found from here (fleetline_cli/localenv.py):
    # the environment's variables win over the file's.
    from fleetline_cli import localenv

    if ctx.invoked_subcommand in NO_LOCAL_ENV:
        return
    try:
        localenv.load()
    except localenv.LocalEnvError as exc:
        fail(str(exc))


@app.command()
def ingest() -> None:
    """Run the ingest service: MQTT telemetry and status into the database."""
    from fleetline_ingest.main import main

    main()


@app.command()
def api() -> None:
    """Run the REST API service."""
    from fleetline_api.main import main

    main()


@app.command()
def rules() -> None:
    """Run the rules service."""
    from fleetline_rules.main import main

    main()


@app.command()
def migrate(
    create_database: Annotated[
        bool, typer.Option(help="Create the database named in FLEETLINE_DATABASE_URL if missing.")
    ] = True,
) -> None:
    """Apply pending database migrations (FLEETLINE_DATABASE_URL)."""
    from fleetline.migrate import MigrationError
    from fleetline.migrate import migrate as run_migrate
    from fleetline.settings import StorageSettings

    try:
        settings = StorageSettings()
    except ValidationError as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging("migrate", level=settings.log_level, fmt=settings.log_format)
    try:
        applied = asyncio.run(run_migrate(settings.dsn, settings, create_database=create_database))
    except MigrationError as exc:
        fail(str(exc))
    except (OSError, asyncpg.PostgresError) as exc:
        fail(_database_unreachable(settings.dsn, exc))
    typer.echo(f"{applied} migration(s) applied")


apikey_app = typer.Typer(
    help="API keys for the REST API: in the database (FLEETLINE_DATABASE_URL), or with "
    "--api over the API (/v1/apikeys) with an admin key (FLEETLINE_API_KEY).",
    no_args_is_help=True,
)
app.add_typer(apikey_app, name="apikey")

OverApiOption = Annotated[
    bool,
    typer.Option(
        "--api",
        help="Over the REST API (FLEETLINE_API_URL) with the admin key in FLEETLINE_API_KEY, "
        "not in the database.",
    ),
]


def _bootstrap_token(source: Path) -> str:
    """The bootstrap token in ``source`` ('-': standard input), its first line."""
    try:
        text = sys.stdin.readline() if str(source) == "-" else source.read_text()
    except OSError as exc:
        fail(f"cannot read the bootstrap token from {source}: {exc.strerror}")
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        fail(f"no bootstrap token in {'standard input' if str(source) == '-' else source}")
    return token


def _database_unreachable(dsn: str, exc: Exception) -> str:
    from fleetline_cli import localenv

    where = localenv.hint("FLEETLINE_DATABASE_URL")
    if localenv.origin("FLEETLINE_DATABASE_URL") is None:
        where += " (a running `fleetline up` writes it to .fleetline/env, which is read here)"
    return f"cannot reach the database at {redact_url(dsn)} ({exc}): {where}"


def _with_database(work: Callable[[asyncpg.Connection[Any]], Awaitable[T]]) -> T:
    from fleetline.db import close_connection
    from fleetline.settings import ServiceSettings

    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        fail(f"invalid settings: {' '.join(str(exc).split())}")

    async def run() -> T:
        try:
            con = await asyncpg.connect(settings.dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            fail(_database_unreachable(settings.dsn, exc))
        try:
            return await work(con)
        except asyncpg.UndefinedTableError:
            fail("the schema is missing; run `fleetline migrate` first")
        finally:
            await close_connection(con)

    return asyncio.run(run())


@apikey_app.command("create")
def apikey_create(
    scope: Annotated[
        list[str], typer.Option("--scope", "-s", help=f"Repeatable: {', '.join(apikeys.SCOPES)}.")
    ],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
    over_api: OverApiOption = False,
    bootstrap_token_file: Annotated[
        Path | None,
        typer.Option(
            help="Over the REST API with the deployment's bootstrap token, read from this "
            "file ('-': standard input): its first admin key, while it has none.",
        ),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Create an API key and print it (-o json/yaml: with its id, name and scopes). It is
    shown this once: store it now."""
    if over_api or bootstrap_token_file is not None:
        from fleetline_cli.client import ApiClient

        token = None if bootstrap_token_file is None else _bootstrap_token(bootstrap_token_file)
        with api_errors():
            body = {"name": name, "scopes": scope}
            answer = ApiClient(key=token).request("POST", "/v1/apikeys", json=body)
        made = {k: answer[k] for k in ("id", "name", "scopes", "token")}
    else:
        try:
            key = _with_database(lambda con: apikeys.create_key(con, name=name, scopes=scope))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        made = {"id": key.id, "name": name, "scopes": sorted(set(scope)), "token": key.token}
    if not printed(made, output):
        typer.echo(made["token"])
    typer.echo(
        f"created key {made['id']} ({', '.join(made['scopes'])}); it is not shown again", err=True
    )


@apikey_app.command("list")
def apikey_list(
    over_api: OverApiOption = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """List API keys (never their secrets)."""
    if over_api:
        docs = api_items("/v1/apikeys")
    else:
        docs = [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(r).items()}
            for r in _with_database(apikeys.list_keys)
        ]
        for doc in docs:  # as the API lists them
            doc["state"] = "revoked" if doc.get("revoked_at") else "active"
    if printed(docs, output, as_json):
        return
    print_table(
        ["id", "state", "scopes", "name", "last used"],
        [
            [
                d["id"],
                ("revoked", "red") if d["revoked_at"] else ("active", "green"),
                ",".join(d["scopes"]),
                d["name"],
                d.get("last_used_at"),
            ]
            for d in docs
        ],
    )


@apikey_app.command("revoke")
def apikey_revoke(
    key: Annotated[str, typer.Argument(help="The key's id, or the whole key")],
    over_api: OverApiOption = False,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    parts = apikeys.split_token(key)
    key_id = parts[0] if parts else key
    if over_api:
        rest("DELETE", f"/v1/apikeys/{quote(key_id, safe='')}")
    elif not _with_database(lambda con: apikeys.revoke(con, key_id)):
        fail(f"no active key {key_id} (`fleetline apikey list` shows them)")
    typer.echo(f"revoked {key_id}")


device_app = typer.Typer(
    help="Devices, over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY).", no_args_is_help=True
)
telemetry_app = typer.Typer(help="Telemetry, over the REST API.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(telemetry_app, name="telemetry")
app.add_typer(enrollment_app, name="enrollment")
app.add_typer(ca_app, name="ca")
app.add_typer(rollout_app, name="rollout")
app.add_typer(file_app, name="file")
app.add_typer(module_app, name="module")
app.add_typer(twin_app, name="twin")
app.add_typer(method_app, name="method")
app.add_typer(c2d_app, name="c2d")
app.add_typer(job_app, name="job")
app.add_typer(rule_app, name="rule")
app.add_typer(alarm_app, name="alarm")
app.add_typer(route_app, name="route")
app.add_typer(dead_letters_app, name="dead-letters")


def _tags(tag: list[str]) -> dict[str, str]:
    pairs = [t.partition("=") for t in tag]
    bad = [t for t, (_k, sep, _v) in zip(tag, pairs, strict=True) if not sep]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} must read name=value", param_hint="--tag")
    return {k: v for k, _sep, v in pairs}


def _show_device(device: dict[str, Any]) -> None:
    state = "online " if device["online"] else "offline"
    tags = " ".join(f"{k}={v}" for k, v in sorted(device["tags"].items()))
    typer.echo(f"{device['id']:32} {state} last seen {device['last_seen'] or '-':32} {tags}")
    if device.get("offline_reason") and not device["online"]:
        typer.echo(f"offline: {device['offline_reason']}")
    if device.get("parent"):
        typer.echo(f"behind gateway {device['parent']}")
    policy = device.get("gateway")
    if policy:
        creates = (
            f"creates children matching {policy['child_id_pattern']!r}"
            if policy["create_children"]
            else "creates no children"
        )
        child_tags = " ".join(f"{k}={v}" for k, v in sorted(policy["child_tags"].items()))
        tagged = f", tagged {child_tags}" if child_tags else ""
        most = f", {policy['max_children']} at most" if policy["create_children"] else ""
        typer.echo(f"gateway: {creates}{tagged}{most}")


GatewayOption = Annotated[
    bool, typer.Option("--gateway", help="A gateway: it publishes for its children.")
]
CreateChildrenOption = Annotated[
    bool,
    typer.Option(
        "--create-children",
        help="A gateway: register a child it publishes for on its first message.",
    ),
]
ChildPatternOption = Annotated[
    str | None,
    typer.Option(
        "--child-pattern", help="A gateway: the ids of children it creates (a regular expression)."
    ),
]
ChildTagOption = Annotated[
    list[str],
    typer.Option("--child-tag", help="A gateway: a tag of children it creates, name=value."),
]
MaxChildrenOption = Annotated[
    int | None,
    typer.Option("--max-children", help="A gateway: it creates no child once it has this many."),
]


def _gateway_policy(
    gateway: bool,
    create_children: bool,
    child_pattern: str | None,
    child_tag: list[str],
    max_children: int | None,
) -> dict[str, Any] | None:
    """The gateway policy the options give (the whole policy: what they leave out takes
    its default); None when they give none."""
    if not (gateway or create_children or child_pattern or child_tag or max_children):
        return None
    policy: dict[str, Any] = {"create_children": create_children, "child_tags": _tags(child_tag)}
    if child_pattern is not None:
        policy["child_id_pattern"] = child_pattern
    if max_children is not None:
        policy["max_children"] = max_children
    return policy


def _show_credentials(creds: dict[str, Any]) -> None:
    typer.echo(f"key (version {creds['key_version']}, shown once): {creds['key']}")
    typer.echo(f"connection string: {creds['connection_string']}")


@device_app.command("create")
def device_create(
    device_id: Annotated[str, typer.Argument(help="[A-Za-z0-9_.:-]{1,128}")],
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="name=value, repeatable")] = [],  # noqa: B006
    cert: Annotated[
        list[Path],
        typer.Option(help="X.509 self-signed: its certificate (PEM); twice for a secondary."),
    ] = [],  # noqa: B006
    thumbprint: Annotated[
        list[str], typer.Option(help="X.509 self-signed: its SHA-256 thumbprint, instead.")
    ] = [],  # noqa: B006
    ca: Annotated[
        str | None,
        typer.Option(help="X.509: a certificate for its id signed by this verified CA."),
    ] = None,
    gateway: GatewayOption = False,
    create_children: CreateChildrenOption = False,
    child_pattern: ChildPatternOption = None,
    child_tag: ChildTagOption = [],  # noqa: B006
    max_children: MaxChildrenOption = None,
    parent: Annotated[
        str | None, typer.Option(help="The gateway it is behind (its messages go through it).")
    ] = None,
    key: Annotated[
        bool, typer.Option(help="Issue its key now (--no-key: a child that only has a gateway).")
    ] = True,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Register a device and print its key and connection string (shown this once), or
    register its X.509 identity (--cert, --thumbprint, --ca). A gateway (--gateway) says
    which children it may create; a child names its gateway (--parent)."""
    from fleetline import certificates

    try:
        prints = [
            *thumbprint,
            *(certificates.thumbprint(certificates.load_pem(p.read_text())).hex() for p in cert),
        ]
    except (OSError, certificates.CertificateError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--cert") from None
    if len(prints) > 2 or (prints and ca):
        raise typer.BadParameter("two certificates at most, and not with --ca")
    auth: dict[str, Any] = {"type": "x509_ca", "ca": ca} if ca else {"type": "key"}
    if prints:
        auth = {"type": "x509_self_signed", "primary_thumbprint": prints[0]}
        if len(prints) == 2:
            auth["secondary_thumbprint"] = prints[1]
    body = {
        "id": device_id,
        "tags": _tags(tag),
        "auth": auth,
        "gateway": _gateway_policy(
            gateway, create_children, child_pattern, child_tag, max_children
        ),
        "parent": parent,
        "issue_key": key,
    }
    device = rest("POST", "/v1/devices", json=body)
    if printed(device, output, as_json):
        return
    _show_device(device)
    if device["credentials"]:
        _show_credentials(device["credentials"])
    elif device["auth"]["type"] == "key":
        typer.echo("no key issued: `fleetline device renew-key` issues one")
    else:
        typer.echo(f"logs in with its certificate ({device['auth']['type']})")


@device_app.command("update")
def device_update(
    device_id: str,
    tag: Annotated[
        list[str], typer.Option("--tag", "-t", help="name=value to set, name= to remove")
    ] = [],  # noqa: B006
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Whether it may connect.")
    ] = None,
    parent: Annotated[
        str | None, typer.Option(help="Move it behind this gateway (at once).")
    ] = None,
    no_parent: Annotated[
        bool, typer.Option("--no-parent", help="Take it from behind its gateway.")
    ] = False,
    gateway: GatewayOption = False,
    create_children: CreateChildrenOption = False,
    child_pattern: ChildPatternOption = None,
    child_tag: ChildTagOption = [],  # noqa: B006
    max_children: MaxChildrenOption = None,
    not_gateway: Annotated[
        bool, typer.Option("--not-gateway", help="No longer a gateway (once it has no children).")
    ] = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Change a device's tags, whether it may connect, its gateway (--parent, --no-parent),
    or its policy as a gateway (--gateway with the child options: the whole policy is
    replaced, what they leave out takes its default; --not-gateway)."""
    if parent is not None and no_parent:
        raise typer.BadParameter("--parent or --no-parent, not both")
    policy = _gateway_policy(gateway, create_children, child_pattern, child_tag, max_children)
    if policy is not None and not_gateway:
        raise typer.BadParameter("--not-gateway takes no gateway options")
    body: dict[str, Any] = {}
    if tag:
        body["tags"] = {k: (v or None) for k, v in _tags(tag).items()}
    if enable is not None:
        body["enabled"] = enable
    if parent is not None or no_parent:
        body["parent"] = parent
    if policy is not None or not_gateway:
        body["gateway"] = policy
    if not body:
        raise typer.BadParameter(
            "nothing to change: give --tag, --enable/--disable, "
            "--parent, --no-parent, --gateway or --not-gateway"
        )
    device = rest("PATCH", f"/v1/devices/{device_id}", json=body)
    if not printed(device, output, as_json):
        _show_device(device)


@device_app.command("refusals")
def device_refusals(
    device_id: str, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """What the broker refused a gateway, by child: its reason, topic and count."""
    rows = rest("GET", f"/v1/devices/{device_id}/refusals", params={"limit": 1000})
    if printed(rows, output, as_json):
        return
    print_table(
        ["child", "reason", "topic", "count", "last refused"],
        [[r["child_id"], r["reason"], r["topic"], r["count"], r["last_refused_at"]] for r in rows],
    )


@device_app.command("renew-key")
def device_renew_key(
    device_id: str, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Issue a new key (shown once); the old key and its tokens stop working."""
    creds = rest("POST", f"/v1/devices/{device_id}/key")
    if not printed(creds, output, as_json):
        _show_credentials(creds)


@device_app.command("token")
def device_token(
    device_id: str,
    ttl: Annotated[int, typer.Option(help="Seconds the token is valid.")] = 3600,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """A SAS token for the device's MQTT password (sig=...&se=...), signed by the API."""
    token = rest("POST", f"/v1/devices/{device_id}/token", json={"ttl_s": ttl})
    if not printed(token, output, as_json):
        typer.echo(token["token"])


DeviceMqttUrl = Annotated[
    str | None,
    typer.Option(
        envvar="FLEETLINE_DEVICE_MQTT_URL",
        help="Where devices reach the broker, mqtts://host:port (a running `fleetline up` "
        "writes it to .fleetline/env).",
    ),
]


@device_app.command("connection-string")
def device_connection_string(
    device_id: str,
    key: Annotated[
        str | None, typer.Option(envvar="FLEETLINE_DEVICE_KEY", help="The device's key.")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Broker host devices connect to (default: the device endpoint)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Broker port devices connect to (default: the device endpoint)."),
    ] = None,
    mqtt_url: DeviceMqttUrl = None,
    renew: Annotated[bool, typer.Option(help="Issue a new key and use it.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """A device's connection string (-o json/yaml: with its device, host and port).
    fleetline never returns a key twice, so give the key you were shown (--key), or issue
    a new one (--renew). The broker is the configured device endpoint (--mqtt-url,
    FLEETLINE_DEVICE_MQTT_URL), else the one the API names for devices, unless --host and
    --port say otherwise."""
    from fleetline import devicekeys
    from fleetline.settings import parse_mqtt_url

    if renew:
        creds = rest("POST", f"/v1/devices/{device_id}/key")
        _print_connection_string(creds["connection_string"], output)
        return
    if not key:
        raise typer.BadParameter("give --key (the key is shown only once) or --renew")
    try:
        devicekeys.fingerprint(key)  # well-formed
    except devicekeys.DeviceKeyError as exc:
        raise typer.BadParameter(str(exc), param_hint="--key") from None
    if (host is None or port is None) and mqtt_url:
        try:
            endpoint = parse_mqtt_url(mqtt_url)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--mqtt-url") from None
        host = host or endpoint.host
        port = port or endpoint.port
    if host is None or port is None:
        named = rest("GET", "/v1/endpoints")
        host = host or named["device_mqtt_host"]
        port = port or named["device_mqtt_port"]
    _print_connection_string(
        devicekeys.connection_string(host=host, port=port, device_id=device_id, key=key), output
    )


def _print_connection_string(text: str, output: Output) -> None:
    fields = {name: value for name, _eq, value in (p.partition("=") for p in text.split(";"))}
    parsed = {
        "device_id": fields.get("DeviceId"),
        "host": fields.get("HostName"),
        "port": int(fields["Port"]) if fields.get("Port", "").isdigit() else None,
        "connection_string": text,
    }
    if not printed(parsed, output):
        typer.echo(text)


firmware_app = typer.Typer(
    help="The device application for MicroPython boards (firmware/README.md).",
    no_args_is_help=True,
)
app.add_typer(firmware_app, name="firmware")


@contextmanager
def _firmware_errors() -> Iterator[None]:
    from fleetline_cli.firmware import FirmwareError

    try:
        yield
    except FirmwareError as exc:
        fail(str(exc))


def _file_sizes(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(p), "size": p.stat().st_size} for p in paths]


def _print_written(written: list[Path], output: Output) -> None:
    if not printed({"wrote": [str(p) for p in written]}, output):
        for path in written:
            typer.echo(f"wrote {path}")


@firmware_app.command("build")
def firmware_build(
    board: Annotated[str, typer.Option(help="The board: esp32, esp8266 or pyboard.")] = "esp32",
    out: Annotated[
        Path | None, typer.Option(help="Folder to write (default: build/firmware-BOARD).")
    ] = None,
    mpy_cross: Annotated[
        str | None,
        typer.Option(envvar="FLEETLINE_MPY_CROSS", help="mpy-cross to compile with."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(help="The application's version, which it reports (its release's)."),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Compile the application into a folder ready to copy to the board."""
    from fleetline_cli import firmware

    folder = out or Path("build") / f"firmware-{board}"
    with _firmware_errors():
        built = firmware.build(board, folder, mpy_cross=mpy_cross, version=version)
    summary = {
        "board": board,
        "folder": str(folder),
        "compiler": built.compiler,
        "files": _file_sizes(built.files),
        "size": built.size,
    }
    if printed(summary, output):
        return
    typer.echo(f"{built.compiler}")
    for path in built.files:
        typer.echo(f"  {path}  {path.stat().st_size:,} bytes")
    typer.echo(f"{len(built.files)} files, {built.size:,} bytes in {folder}")


@firmware_app.command("bundle")
def firmware_bundle(
    build: Annotated[Path, typer.Argument(help="A `firmware build` folder.")],
    out: Annotated[Path, typer.Option(help="The bundle file to write.")],
    output: OutputOption = Output.table,
) -> None:
    """Pack a build's application files into a bundle to release (`firmware upload`):
    boards on an earlier version update themselves to it through a rollout. The
    loader (boot.py, fleetline_boot) and the board's settings are not in it."""
    from fleetline_cli import firmware

    with _firmware_errors():
        files = firmware.bundle(build, out)
    summary = {"bundle": str(out), "size": out.stat().st_size, "files": _file_sizes(files)}
    if not printed(summary, output):
        typer.echo(f"wrote {out}: {len(files)} files, {out.stat().st_size:,} bytes")


@firmware_app.command("keygen")
def firmware_keygen(
    out: Annotated[Path, typer.Option(help="Where to write the private key (PEM, owner-only).")],
    output: OutputOption = Output.table,
) -> None:
    """Make a release key: it signs the manifest of every firmware release, and the boards
    carry its public half (RELEASE_KEY in config_local.py) to check them."""
    from fleetline import releases

    key = releases.generate_key()
    with _firmware_errors():
        try:
            releases.write_key(out, key)
        except releases.ReleaseError as exc:
            from fleetline_cli.firmware import FirmwareError

            raise FirmwareError(str(exc)) from None
    public = releases.public_point(key).hex()
    if printed({"key_file": str(out), "release_key": public}, output):
        typer.echo(f"wrote {out}: keep it secret and backed up, it signs every release", err=True)
        return
    typer.echo(f"wrote {out}: keep it secret and backed up, it signs every release")
    typer.echo(f'RELEASE_KEY = "{public}"  # in each board\'s config_local.py')


# What `firmware sign` and `firmware upload` take.
ReleaseImage = Annotated[Path, typer.Argument(help="The image or bundle file to release.")]
ReleaseVersion = Annotated[str, typer.Option(help="The release's version, e.g. 2.1.0.")]
ReleaseTarget = Annotated[str, typer.Option(help="The board or model it is for, e.g. esp32.")]
ReleaseKind = Annotated[
    str, typer.Option(help="bundle (application files) or image (a whole firmware).")
]


@firmware_app.command("sign")
def firmware_sign(
    image: ReleaseImage,
    *,
    version: ReleaseVersion,
    target: ReleaseTarget,
    kind: ReleaseKind = "bundle",
    key: Annotated[
        Path,
        typer.Option(envvar="FLEETLINE_API_RELEASE_KEY_FILE", help="The release key (PEM)."),
    ] = Path("release-key.pem"),
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default: IMAGE.release.json).")
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Sign IMAGE's manifest (version, target, kind, size, SHA-256) with the release key."""
    from fleetline_cli import firmware

    with _firmware_errors():
        written = firmware.sign_release(
            image, version=version, target=target, kind=kind, key_file=key, out=out
        )
    if not printed({"path": str(written), **json.loads(written.read_text())}, output):
        typer.echo(f"wrote {written}")


@firmware_app.command("upload")
def firmware_upload(
    image: ReleaseImage,
    *,
    version: ReleaseVersion,
    target: ReleaseTarget,
    kind: ReleaseKind = "bundle",
    notes: Annotated[str, typer.Option(help="What changed, for people.")] = "",
    part_size: Annotated[
        int,
        typer.Option(min=1024, help="Bytes per request, within the API's body limit."),
    ] = 512 * 1024,
    output: OutputOption = Output.table,
) -> None:
    """Upload IMAGE as a release to the API (FLEETLINE_API_URL), which signs its manifest
    with its release key. The upload resumes by itself after a dropped connection, and
    run again after an interruption goes on with the same upload."""
    from fleetline_cli import firmware
    from fleetline_cli.client import ApiClient

    def progress(sent: int, size: int) -> None:
        typer.echo(f"  {sent:,} of {size:,} bytes ({100 * sent // size}%)", err=True)

    with _firmware_errors(), api_errors():
        release = firmware.upload_release(
            ApiClient(),
            image,
            version=version,
            target=target,
            kind=kind,
            notes=notes,
            progress=progress,
            part_bytes=part_size,
        )
    if not printed(release, output):
        typer.echo(
            f"released {release['target']} {release['version']} as firmware "
            f"{release['id']} ({release['size']:,} bytes, sha256 {release['sha256']})"
        )


@firmware_app.command("list")
def firmware_list(
    target: Annotated[str | None, typer.Option(help="Only releases for this target.")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="The newest this many, at most.")
    ] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Firmware releases, newest first (unfinished uploads too)."""
    releases = api_items("/v1/firmware", at_most=limit, target=target)
    if printed(releases, output, as_json):
        return
    print_table(
        ["id", "target", "version", "kind", "status", "size", "released"],
        [
            [
                r["id"],
                r["target"],
                r["version"],
                r["kind"],
                r["status"]
                if r["status"] == "released"
                else (f"uploading ({r['received']:,} bytes so far)", "yellow"),
                f"{r['size']:,}",
                r["released_at"],
            ]
            for r in releases
        ],
    )


@firmware_app.command("show")
def firmware_show(
    firmware_id: Annotated[int, typer.Argument(help="The release's id.")],
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """One firmware release, with its signed manifest."""
    r = rest("GET", f"/v1/firmware/{firmware_id}")
    if printed(r, output, as_json):
        return
    typer.echo(f"firmware {r['id']}: {r['target']} {r['version']} ({r['kind']}), {r['status']}")
    typer.echo(f"  {r['size']:,} bytes, sha256 {r['sha256']}")
    if r["status"] != "released":
        typer.echo(f"  {r['received']:,} bytes uploaded so far")
    typer.echo(f"  created {r['created_at']}, released {r['released_at'] or '-'}")
    if r["notes"]:
        typer.echo(f"  notes: {r['notes']}")
    if r["manifest"]:
        typer.echo(f"  manifest {r['manifest']}")
        typer.echo(f"  signature {r['signature']}")


@firmware_app.command("delete")
def firmware_delete(
    firmware_id: Annotated[int, typer.Argument(help="The release's id.")],
) -> None:
    """Delete a release and its image (not while a rollout of it is unfinished)."""
    rest("DELETE", f"/v1/firmware/{firmware_id}")
    typer.echo(f"deleted firmware {firmware_id}")


@firmware_app.command("config")
def firmware_config(
    device_id: Annotated[
        str | None, typer.Argument(help="The device (omit with --enrollment).")
    ] = None,
    *,
    wifi_ssid: Annotated[str, typer.Option(help="The Wi-Fi the board joins.")],
    wifi_password: Annotated[
        str, typer.Option(envvar="FLEETLINE_WIFI_PASSWORD", prompt=True, hide_input=True)
    ],
    out: Annotated[
        Path | None, typer.Option(help="Folder to write (default: build/config-DEVICE_ID).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(envvar="FLEETLINE_DEVICE_KEY", help="The device's key.")
    ] = None,
    renew: Annotated[bool, typer.Option(help="Issue a new key over the API and use it.")] = False,
    mqtt_url: Annotated[
        str | None,
        typer.Option(
            envvar=["FLEETLINE_DEVICE_MQTT_URL", "FLEETLINE_API_DEVICE_MQTT_URL"],
            help="Where devices reach the broker (with --key), e.g. mqtts://broker:8883.",
        ),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="FLEETLINE_DEVICE_CA_FILE",
            help="The CA certificate that signed the broker's (`fleetline up` prints it).",
        ),
    ] = None,
    plain: Annotated[
        bool, typer.Option(help="No TLS: the key or token crosses the network in clear.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between readings.")] = 10.0,
    enrollment: Annotated[
        str | None,
        typer.Option(help="Provision on first boot through this enrollment (no DEVICE_ID)."),
    ] = None,
    group_key: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETLINE_GROUP_KEY",
            help="With --enrollment: the group's key (only the board's own key is written).",
        ),
    ] = None,
    registration_id: Annotated[
        str | None, typer.Option(help="With --enrollment: the id the board registers as.")
    ] = None,
    release_key: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETLINE_RELEASE_KEY",
            help="The release key's public point (hex: `firmware keygen` printed it, GET "
            "/v1/release-key gives it): the board then takes firmware updates.",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="With --release-key: the releases' target (default: the board's)."),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Write a board's config_local.py (and its CA file) for DEVICE_ID. fleetline never
    returns a key twice: give the key you were shown (--key) or issue a new one (--renew).
    With --enrollment (and --registration-id, --group-key, --mqtt-url) the board
    registers itself on first boot instead, with its own key derived from the group's
    (the group key is not written)."""
    from fleetline import devicekeys
    from fleetline.settings import parse_mqtt_url
    from fleetline_cli import firmware

    if ca_file is None and not plain:
        raise typer.BadParameter(
            "give the broker's CA certificate (--ca-file) or --plain for MQTT without TLS",
            param_hint="--ca-file",
        )
    updates: dict[str, object] = {}
    if release_key is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{128}", release_key):
            raise typer.BadParameter(
                "the release key's public point is 128 hex digits (x || y)",
                param_hint="--release-key",
            )
        updates["RELEASE_KEY"] = release_key.lower()
        if target is not None:
            updates["TARGET"] = target
    if enrollment is not None:
        if device_id is not None or not (group_key and registration_id and mqtt_url):
            raise typer.BadParameter(
                "--enrollment goes with --registration-id, --group-key and --mqtt-url, "
                "without DEVICE_ID"
            )
        try:
            registration_key = devicekeys.registration_key(group_key, registration_id)
            broker = parse_mqtt_url(mqtt_url)
        except (devicekeys.DeviceKeyError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None
        folder = out or Path("build") / f"config-{registration_id}"
        with _firmware_errors():
            written = firmware.write_config(
                folder,
                connection_string="",
                wifi_ssid=wifi_ssid,
                wifi_password=wifi_password,
                ca_source=None if plain else ca_file,
                interval_s=interval,
                extra={
                    "ENROLLMENT": enrollment,
                    "REGISTRATION_ID": registration_id,
                    "REGISTRATION_KEY": registration_key,
                    "PROVISIONING_HOST": broker.host,
                    "PROVISIONING_PORT": broker.port,
                    **updates,
                },
            )
        _print_written(written, output)
        return
    if device_id is None:
        raise typer.BadParameter("give DEVICE_ID, or --enrollment")
    if renew:
        connection_string = rest("POST", f"/v1/devices/{device_id}/key")["connection_string"]
    elif key:
        if not mqtt_url:
            raise typer.BadParameter(
                "with --key, say where devices reach the broker", param_hint="--mqtt-url"
            )
        try:
            devicekeys.fingerprint(key)
            broker = parse_mqtt_url(mqtt_url)
        except (devicekeys.DeviceKeyError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None
        if broker.tls == plain:  # mqtts:// with --plain, or mqtt:// with a CA
            raise typer.BadParameter(
                "mqtts:// goes with --ca-file, mqtt:// with --plain", param_hint="--mqtt-url"
            )
        connection_string = devicekeys.connection_string(
            host=broker.host, port=broker.port, device_id=device_id, key=key
        )
    else:
        raise typer.BadParameter("give --key (the key is shown only once) or --renew")
    folder = out or Path("build") / f"config-{device_id}"
    with _firmware_errors():
        written = firmware.write_config(
            folder,
            connection_string=connection_string,
            wifi_ssid=wifi_ssid,
            wifi_password=wifi_password,
            ca_source=None if plain else ca_file,
            interval_s=interval,
            extra=updates,
        )
    _print_written(written, output)


@firmware_app.command("flash")
def firmware_flash(
    port: Annotated[str, typer.Option(help="The board's serial port, e.g. /dev/ttyUSB0.")],
    build: Annotated[Path, typer.Option(help="A `firmware build` folder.")] = Path(
        "build/firmware-esp32"
    ),
    config: Annotated[Path | None, typer.Option(help="A `firmware config` folder.")] = None,
    mpremote: Annotated[str, typer.Option(help="mpremote to run.")] = "mpremote",
    dry_run: Annotated[bool, typer.Option(help="Print the mpremote command only.")] = False,
) -> None:
    """Copy the application (and a device's config) to a board with mpremote, then
    reset it. MicroPython itself is flashed with esptool (firmware/README.md)."""
    import shlex
    import shutil
    import subprocess

    from fleetline_cli import firmware

    files = sorted(p for p in build.glob("*") if p.suffix in (".mpy", ".py"))
    if not files:
        raise typer.BadParameter(f"{build} holds no build (run `fleetline firmware build`)")
    if config is not None:
        files += sorted(p for p in config.glob("*") if p.is_file())
    command = firmware.flash_command(port, files, mpremote=mpremote)
    if dry_run:
        typer.echo(shlex.join(command))
        return
    if shutil.which(mpremote) is None:
        fail(f"{mpremote} not found (pip install mpremote)")
    raise typer.Exit(subprocess.run(command, check=False).returncode)


@device_app.command("list")
def device_list(
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="name=value, repeatable")] = [],  # noqa: B006
    status: Annotated[str | None, typer.Option(help="online or offline")] = None,
    parent: Annotated[str | None, typer.Option(help="Only this gateway's children.")] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """List devices (all pages), filtered by tags, status and gateway."""
    tags = [f"{k}={v}" for k, v in _tags(tag).items()]
    devices = api_items("/v1/devices", tag=tags, status=status or None, parent=parent)
    if not printed(devices, output, as_json):
        print_table(
            ["device", "status", "last seen", "key", "gateway", "tags"],
            [
                [
                    d["id"],
                    ("online", "green") if d["online"] else ("offline", "dim"),
                    d["last_seen"],
                    f"v{d['key_version']}" if d.get("key_version") else ("none", "yellow"),
                    "gateway" if d.get("gateway") else d.get("parent") or "",
                    " ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())),
                ]
                for d in devices
            ],
        )


@device_app.command("query")
def device_query(
    query: Annotated[str, typer.Argument(help="e.g. \"tags.site = 'A' AND reported.fw < '1.2'\"")],
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Devices a query matches (all pages), with their twin versions."""
    devices = api_items("/v1/query", q=query)
    if printed(devices, output, as_json):
        return
    print_table(
        ["device", "status", "desired", "reported", "tags"],
        [
            [
                d["device_id"],
                ("online", "green") if d["online"] else ("offline", "dim"),
                f"v{d['desired_version']}",
                f"v{d['reported_version']}",
                " ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())),
            ]
            for d in devices
        ],
    )


@device_app.command("show")
def device_show(
    device_id: str, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """One device and the latest value of each of its metrics."""
    device = rest("GET", f"/v1/devices/{device_id}")
    latest = rest("GET", f"/v1/devices/{device_id}/latest")
    if printed({**device, "latest": latest["metrics"]}, output, as_json):
        return
    _show_device(device)
    for metric, point in sorted(latest["metrics"].items()):
        value = point["value"] if point["value"] is not None else point["value_text"]
        typer.echo(f"  {metric:24} {value!s:>16}  at {point['ts']}")


@device_app.command("delete")
def device_delete(device_id: str) -> None:
    """Remove a device from the registry (its readings stay until the retention)."""
    rest("DELETE", f"/v1/devices/{device_id}")
    typer.echo(f"deleted {device_id}")


@telemetry_app.command("query")
def telemetry_query(
    device_id: str,
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="Repeatable")] = [],  # noqa: B006
    start: Annotated[str | None, typer.Option("--from", help="RFC 3339, with offset")] = None,
    end: Annotated[str | None, typer.Option("--to", help="RFC 3339, with offset")] = None,
    bucket: Annotated[str | None, typer.Option(help="e.g. 5m, 1h: aggregates")] = None,
    limit: Annotated[int, typer.Option(help="Raw points at most")] = 1000,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Raw points of a device, or time-bucketed aggregates with --bucket."""
    params: dict[str, Any] = {"metric": metric, "limit": limit}
    for name, value in (("from", start), ("to", end), ("bucket", bucket)):
        if value:
            params[name] = value
    result = rest("GET", f"/v1/devices/{device_id}/telemetry", params=params)
    if printed(result["items"], output, as_json):
        return
    items = result["items"]
    if bucket:
        stats = ("avg", "min", "max", "count", "last")
        print_table(
            ["bucket", "metric", *stats],
            [[i["bucket"], i["metric"], *(i.get(k) for k in stats)] for i in items],
        )
    else:
        print_table(
            ["ts", "metric", "value"],
            [
                [i["ts"], i["metric"], i["value"] if i["value"] is not None else i["value_text"]]
                for i in items
            ],
        )


@app.command()
def up(
    devices: Annotated[int, typer.Option(help="Simulated devices to run (0: none).")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between a device's readings.")] = 2.0,
    data_dir: Annotated[
        str, typer.Option(help="Where the embedded database and broker keep their data.")
    ] = ".fleetline",
    gateways: Annotated[
        int, typer.Option(min=0, help="Simulated gateways, each publishing for its children.")
    ] = 0,
    children_per_gateway: Annotated[
        int, typer.Option(min=0, help="Children behind each simulated gateway.")
    ] = 10,
) -> None:
    """Run the whole system: database and broker (embedded unless FLEETLINE_DATABASE_URL /
    FLEETLINE_MQTT_URL are set), migrations, the three services and a simulated fleet."""
    from fleetline_dev.up import run_up

    raise typer.Exit(
        run_up(
            devices=devices,
            interval_seconds=interval,
            data_dir=data_dir,
            gateways=gateways,
            children_per_gateway=children_per_gateway,
        )
    )


@app.command()
def simulate(
    devices: Annotated[int, typer.Option(min=0, help="Simulated devices to run.")] = 10,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between a device's readings.")
    ] = 2.0,
    prefix: Annotated[
        str,
        typer.Option(
            help="Their ids: PREFIX0000, PREFIX0001... (not `fleetline up`'s sim-: those "
            "would be issued new keys, locking out its own simulated devices)."
        ),
    ] = "simulated-",
    mqtt_url: DeviceMqttUrl = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="FLEETLINE_DEVICE_CA_FILE",
            help="The CA certificate the broker's is verified against (mqtts://; default: "
            "the system's CAs).",
        ),
    ] = None,
    duration: Annotated[
        float, typer.Option(min=0, help="Stop after this many seconds (0: at Ctrl-C).")
    ] = 0,
    gateways: Annotated[
        int,
        typer.Option(
            min=0, help="Simulated gateways (PREFIXgw-00...), each publishing for its children."
        ),
    ] = 0,
    children_per_gateway: Annotated[
        int, typer.Option(min=0, help="Children behind each simulated gateway.")
    ] = 10,
) -> None:
    """Simulated devices against a deployment (FLEETLINE_API_URL), until Ctrl-C.

    They are registered over the API (a key with devices:write), each with its own key
    (simulated devices of the prefix registered already get a new one; any other device of
    the prefix stops it, keeping its key), connect to the broker the
    API names for devices (FLEETLINE_DEVICE_MQTT_URL instead) and publish readings,
    answer methods, take twin changes and cloud-to-device messages. Gateways (--gateways)
    are registered as gateways that create their children (GATEWAY-c000...) on their
    first message, and publish for them."""
    from fleetline_cli import simulate as sim
    from fleetline_cli.client import ApiClient
    from fleetline_dev.simulated_gateways import gateway_ids
    from fleetline_dev.simulator import device_ids

    if ca_file is not None and not ca_file.is_file():
        raise typer.BadParameter(f"{ca_file} is not a file", param_hint="--ca-file")
    if not prefix:
        raise typer.BadParameter("must not be empty", param_hint="--prefix")
    if devices == 0 and gateways == 0:
        raise typer.BadParameter("nothing to simulate: give --devices N or --gateways G")
    ids = device_ids(devices, prefix) if devices else []
    gateway_prefix = f"{prefix}gw-"
    gateway_list = gateway_ids(gateways, gateway_prefix) if gateways else []
    with api_errors():
        client = ApiClient()
        try:
            target = sim.broker(client, mqtt_url, ca_file)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--mqtt-url") from None
        keys = sim.register(client, ids)
        keys |= sim.register_gateways(client, gateway_list, children=children_per_gateway)
    scheme = "mqtts" if target.tls else "mqtt"
    what = [f"{devices} devices ({ids[0]}...{ids[-1]})"] if ids else []
    if gateway_list:
        what.append(
            f"{gateways} gateway{'s' if gateways > 1 else ''} ({gateway_list[0]}"
            f"{'...' + gateway_list[-1] if gateways > 1 else ''}) with "
            f"{children_per_gateway} children each"
        )
    typer.echo(
        f"simulating {' and '.join(what)} on {scheme}://{target.host}:{target.port}, "
        f"a reading every {interval:g} s; Ctrl-C stops",
        err=True,
    )
    setup_logging("simulate", fmt="console")
    # paho logs every socket error of every device; the simulator logs its own.
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    try:
        asyncio.run(
            sim.run(
                target,
                keys,
                devices=devices,
                interval_seconds=interval,
                prefix=prefix,
                duration_seconds=duration,
                gateways=gateways,
                children_per_gateway=children_per_gateway,
                gateway_prefix=gateway_prefix,
            )
        )
    except KeyboardInterrupt:
        pass


@app.command()
def monitor(
    device: Annotated[list[str], typer.Option("--device", "-d", help="Repeatable")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="name=value, repeatable")] = [],  # noqa: B006
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="Repeatable")] = [],  # noqa: B006
    events: Annotated[
        str, typer.Option(help="Comma list of telemetry, status, alarm")
    ] = "telemetry,status,alarm",
    count: Annotated[int, typer.Option(help="Stop after this many events (0: never).")] = 0,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Live events (stored telemetry, status changes, alarms) from /v1/stream, until Ctrl-C.

    -o json prints one JSON object a line; -o yaml one YAML document per event."""
    from fleetline_cli.client import ApiError, stream_events
    from fleetline_cli.common import to_yaml

    if as_json:
        output = Output.json

    def line(event: dict[str, Any]) -> str:
        if output is Output.json:
            return json.dumps(event)
        if output is Output.yaml:
            return "---\n" + to_yaml(event).rstrip("\n")
        return _event_line(event)

    params = {
        "device": device,
        "tag": [f"{k}={v}" for k, v in _tags(tag).items()],
        "metric": metric,
        "events": events,
    }

    async def run() -> None:
        seen = 0
        async for event in stream_events(params):
            if event.get("type") == "subscribed":
                if output is Output.table:
                    typer.echo("listening for events (Ctrl-C stops)", err=True)
                continue
            typer.echo(line(event))
            seen += 1
            if count and seen >= count:
                return

    try:
        asyncio.run(run())
    except ApiError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def _event_line(event: dict[str, Any]) -> str:
    head = f"{event.get('ts', '')}  {event.get('device_id', ''):24}"
    if event.get("type") == "telemetry":
        values = " ".join(f"{k}={v}" for k, v in event.get("values", {}).items())
        return f"{head} {values}"
    if event.get("type") == "status":
        return f"{head} {'online' if event.get('online') else 'offline'}"
    if event.get("type") == "alarm":
        alarm = event.get("alarm", {})
        return f"{head} ALARM {alarm.get('severity', '')} {alarm.get('state', '')}: " + str(
            alarm.get("message", "")
        )
    return f"{head} {json.dumps(event)}"


if __name__ == "__main__":
    app()
