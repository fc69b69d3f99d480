"""Every command of the command line that prints data takes ``-o/--output`` (README,
docs/cli.md section 2): a walk of the whole command tree finds any that does not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer.main

from fleetline_cli.common import Output
from fleetline_cli.main import app

# The commands that print no data, only what they did or what goes on.
NO_DATA = {
    # The services, run as a container runs them: they log.
    "ingest",
    "api",
    "rules",
    # Runs the whole system, or a simulated fleet, until Ctrl-C: they log.
    "up",
    "simulate",
    # How many migrations it applied.
    "migrate",
    # Copies files to a board with mpremote (--dry-run: the command it would run).
    "firmware flash",
    # Removals: "deleted X" or "revoked X", nothing more.
    "apikey revoke",
    "device delete",
    "module delete",
    "enrollment delete",
    "ca delete",
    "file delete",
    "rule delete",
    "route delete",
    "firmware delete",
}


def leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Each command that runs something (no group), by its full name."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield " ".join(path), command
        return
    for name, sub in subcommands.items():
        yield from leaves(sub, (*path, name))


def test_every_command_that_prints_data_takes_output() -> None:
    commands = dict(leaves(typer.main.get_command(app)))
    assert len(commands) > 50 and "device list" in commands
    missing = sorted(
        name
        for name, command in commands.items()
        if name not in NO_DATA and not any("--output" in p.opts for p in command.params)
    )
    assert not missing, f"commands without -o/--output (or add them to NO_DATA): {missing}"
    # The shared option everywhere (fleetline_cli/common.py): -o, the same forms, a table
    # by default.
    for name, command in commands.items():
        for param in command.params:
            if "--output" in param.opts:
                assert "-o" in param.opts, name
                assert param.type_descriptor.annotation is Output, name
                assert param.default is Output.table, name
    # NO_DATA names only commands that exist and print no data.
    assert NO_DATA <= commands.keys(), NO_DATA - commands.keys()
    stale = sorted(
        name for name in NO_DATA if any("--output" in p.opts for p in commands[name].params)
    )
    assert not stale, f"commands in NO_DATA that take -o: {stale}"
