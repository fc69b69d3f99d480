"""What the command line's groups share: REST calls with one-line errors, the output
forms (a table for people, JSON or YAML for scripts), documents read from files."""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer


class Output(StrEnum):
    """How a command prints what it got: a table (or lines) for people, JSON or YAML."""

    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table (for people), json or yaml (for scripts).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts (-o json).")]
# Without a terminal (a pipe, a file) tables are not cut to 80 columns.
PIPE_WIDTH = 240


def fail(message: str) -> NoReturn:
    """One line on stderr, exit code 1: what went wrong, and what to do about it."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _yaml() -> Any:
    # PyYAML ships no type information; it is used through this one door.
    return importlib.import_module("yaml")


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2 if sys.stdout.isatty() else None)


def to_yaml(value: Any) -> str:
    text: str = _yaml().safe_dump(
        value, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    return text


def printed(value: Any, output: Output, as_json: bool = False) -> bool:
    """Print ``value`` as JSON (``-o json``, ``--json``) or YAML (``-o yaml``) and say
    so; False for ``-o table``, which the caller prints its own way."""
    if as_json or output is Output.json:
        typer.echo(to_json(value))
        return True
    if output is Output.yaml:
        typer.echo(to_yaml(value), nl=False)
        return True
    return False


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    """A table for people (``-o json`` and ``-o yaml`` are the forms for scripts)."""
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


def compact(value: Any, width: int = 60) -> str:
    """A JSON value on one line, cut to ``width`` characters (for a table's cell)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain_yaml_loader() -> Any:
    """YAML's safe loader, but only true/false are booleans: YAML 1.1 reads ``on``, ``off``,
    ``yes`` and ``no`` as booleans too, and a rule action's ``on:`` must stay a name."""
    yaml = _yaml()
    safe_loader: Any = yaml.SafeLoader

    class Loader(safe_loader):  # type: ignore[misc]
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return Loader


def parse_document(text: str, what: str) -> Any:
    """JSON or YAML text as a value; a usage error naming ``what`` when it is neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=_plain_yaml_loader())
    except yaml.YAMLError as exc:
        raise typer.BadParameter(
            f"neither JSON nor YAML: {str(exc).splitlines()[0]}", param_hint=what
        ) from None


def read_document(source: str, what: str) -> Any:
    """The JSON or YAML document in the file ``source`` (``-``: standard input)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {source}: {exc.strerror}", param_hint=what) from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{source} is not UTF-8 text", param_hint=what) from None
    return parse_document(text, what)


def json_argument(text: str, what: str) -> Any:
    """A JSON value given on the command line (a usage error when it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=what) from None


def document_argument(text: str, what: str) -> Any:
    """A JSON value given on the command line, or the JSON or YAML document of the file
    ``@FILE`` or of standard input (``-``)."""
    if text == "-":
        return read_document("-", what)
    if text.startswith("@"):
        return read_document(text[1:], what)
    return json_argument(text, what)


def json_object(text: str, what: str) -> dict[str, Any]:
    value = json_argument(text, what)
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object ({...})", param_hint=what)
    return value


@contextmanager
def api_errors() -> Iterator[None]:
    """An API problem or an unreachable API: one line on stderr, exit code 1."""
    from fleetline_cli.client import ApiError

    try:
        yield
    except ApiError as exc:
        fail(str(exc))


def api(method: str, path: str, **kwargs: Any) -> Any:
    from fleetline_cli.client import ApiClient

    with api_errors():
        return ApiClient().request(method, path, **kwargs)


def api_items(path: str, *, at_most: int | None = None, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged listing (or the first ``at_most``), 1,000 a page (parameters
    that are None are left out); an error as ``api`` gives it."""
    from fleetline_cli.client import ApiClient

    page = min(1000, at_most) if at_most else 1000
    query = {"limit": page, **{k: v for k, v in params.items() if v is not None}}
    items: list[dict[str, Any]] = []
    with api_errors():
        for item in ApiClient().pages(path, query):
            items.append(item)
            if at_most is not None and len(items) >= at_most:
                break
    return items
