"""The ``fleetline`` command line."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from fleetline.logs import setup_logging

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
