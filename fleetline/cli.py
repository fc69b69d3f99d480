"""The ``fleetline`` command line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from fleetline import apikeys
from fleetline.logs import setup_logging

T = TypeVar("T")

app = typer.Typer(
    help="fleetline: an IoT fleet backend (MQTT ingest, REST API, rules) on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


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

    settings = StorageSettings()
    setup_logging("migrate", level=settings.log_level, fmt=settings.log_format)
    try:
        applied = asyncio.run(run_migrate(settings.dsn, settings, create_database=create_database))
    except MigrationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{applied} migration(s) applied")


apikey_app = typer.Typer(
    help="API keys for the REST API (FLEETLINE_DATABASE_URL).", no_args_is_help=True
)
app.add_typer(apikey_app, name="apikey")


def _with_database(work: Callable[[asyncpg.Connection[Any]], Awaitable[T]]) -> T:
    from fleetline.db import close_connection
    from fleetline.settings import ServiceSettings

    settings = ServiceSettings()

    async def run() -> T:
        try:
            con = await asyncpg.connect(settings.dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise typer.BadParameter(f"cannot reach the database: {exc}") from None
        try:
            return await work(con)
        except asyncpg.UndefinedTableError:
            typer.echo("error: the schema is missing; run `fleetline migrate` first", err=True)
            raise typer.Exit(1) from None
        finally:
            await close_connection(con)

    return asyncio.run(run())


@apikey_app.command("create")
def apikey_create(
    scope: Annotated[
        list[str], typer.Option("--scope", "-s", help=f"Repeatable: {', '.join(apikeys.SCOPES)}.")
    ],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
) -> None:
    """Create an API key and print it. It is shown this once: store it now."""
    try:
        key = _with_database(lambda con: apikeys.create_key(con, name=name, scopes=scope))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scope") from None
    typer.echo(key.token)
    typer.echo(
        f"created key {key.id} ({', '.join(sorted(set(scope)))}); it is not shown again", err=True
    )


@apikey_app.command("list")
def apikey_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")] = False,
) -> None:
    """List API keys (never their secrets)."""
    rows = _with_database(apikeys.list_keys)
    docs = [
        {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(r).items()}
        for r in rows
    ]
    if as_json:
        typer.echo(json.dumps(docs))
        return
    for d in docs:
        state = "revoked" if d["revoked_at"] else "active"
        typer.echo(f"{d['id']}  {state:8} {','.join(d['scopes']):40} {d['name']}")


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (flk_<id>_...).")],
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    if not _with_database(lambda con: apikeys.revoke(con, key_id)):
        typer.echo(f"error: no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def up(
    devices: Annotated[int, typer.Option(help="Simulated devices to run (0: none).")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between a device's readings.")] = 2.0,
    data_dir: Annotated[
        str, typer.Option(help="Where the embedded database and broker keep their data.")
    ] = ".fleetline",
) -> None:
    """Run the whole system: database and broker (embedded unless FLEETLINE_DATABASE_URL /
    FLEETLINE_MQTT_URL are set), migrations, the three services and a simulated fleet."""
    from fleetline.up import run_up

    raise typer.Exit(run_up(devices=devices, interval_seconds=interval, data_dir=data_dir))


if __name__ == "__main__":
    app()
