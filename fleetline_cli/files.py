"""``fleetline file``: files uploaded by devices (docs/uploads.md), over the REST API
(FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    api_errors,
    api_items,
    print_table,
    printed,
)

file_app = typer.Typer(help="Files devices uploaded (docs/uploads.md).", no_args_is_help=True)


@file_app.command("list")
def file_list(
    device_id: str,
    state: Annotated[str | None, typer.Option(help="uploading or complete")] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """The device's files, newest first (unfinished uploads too)."""
    files = api_items(f"/v1/devices/{device_id}/files", state=state)
    if printed(files, output, as_json):
        return
    print_table(
        ["id", "name", "state", "size", "type", "sha256", "uploaded"],
        [
            [
                f["id"],
                f["name"],
                f["state"] if f["state"] == "complete" else f"{f['received']:,} bytes so far",
                f"{f['size']:,}",
                f["content_type"],
                f["sha256"][:16],
                f["completed_at"] or f["created_at"],
            ]
            for f in files
        ],
    )


@file_app.command("download")
def file_download(
    device_id: str,
    file_id: int,
    out: Annotated[Path | None, typer.Option(help="Where to write (default: its name).")] = None,
    output: OutputOption = Output.table,
) -> None:
    """Write a file the device uploaded (-o json/yaml: the file as the API lists it, with
    where it was written)."""
    from fleetline_cli.client import ApiClient

    meta = api("GET", f"/v1/devices/{device_id}/files/{file_id}")
    target = out or Path(meta["name"])
    with api_errors():
        size = ApiClient().download(f"/v1/devices/{device_id}/files/{file_id}/content", target)
    if not printed({**meta, "path": str(target), "written": size}, output):
        typer.echo(f"wrote {target}: {size:,} bytes")


@file_app.command("delete")
def file_delete(device_id: str, file_id: int) -> None:
    """Delete a file (or an unfinished upload)."""
    api("DELETE", f"/v1/devices/{device_id}/files/{file_id}")
    typer.echo(f"deleted file {file_id} of {device_id}")
