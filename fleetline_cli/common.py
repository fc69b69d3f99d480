"""What the command line's groups share: REST calls with one-line errors, tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
# Without a terminal (a pipe, a file) tables are not cut to 80 columns.
PIPE_WIDTH = 240


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    """A table for people (``--json`` is the form for scripts)."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def cell(value: Any) -> Text:
        # Data is never read as markup; (text, style) pairs are styled.
        if isinstance(value, tuple):
            return Text(*value)
        return Text("-" if value is None else str(value))

    table = Table(*columns, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    Console(width=None if sys.stdout.isatty() else PIPE_WIDTH).print(table)


@contextmanager
def api_errors() -> Iterator[None]:
    """An API problem or an unreachable API: one line on stderr, exit code 1."""
    from fleetline_cli.client import ApiError

    try:
        yield
    except ApiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def api(method: str, path: str, **kwargs: Any) -> Any:
    from fleetline_cli.client import ApiClient

    with api_errors():
        return ApiClient().request(method, path, **kwargs)


def api_items(path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged listing, 1,000 a page (parameters that are None are left
    out); an error as ``api`` gives it."""
    from fleetline_cli.client import ApiClient

    query = {"limit": 1000, **{k: v for k, v in params.items() if v is not None}}
    with api_errors():
        return list(ApiClient().pages(path, query))
