"""python -m fleetline_dev.grafana [--check] [DIRECTORY]: render the dashboards."""

from __future__ import annotations

import sys
from pathlib import Path

from fleetline_dev.grafana import write

DEFAULT = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    rest = [a for a in argv if a != "--check"]
    directory = Path(rest[0]) if rest else DEFAULT
    stale = write(directory, check=check)
    if stale:
        sys.stderr.write(
            f"out of date in {directory}: {', '.join(stale)}; run python -m fleetline_dev.grafana\n"
        )
        return 1
    sys.stdout.write(f"{'checked' if check else 'wrote'} {directory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
