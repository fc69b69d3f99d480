"""The README's shell examples, run as a reader would run them against ``fleetline up``.

Every ```sh block of the README runs, in the README's order, in one bash session in the
repository's folder, except a block that an HTML comment just above marks
``<!-- not run: why -->``. ``http://127.0.0.1:8000`` becomes the API of the deployment
under test, the command line finds it through its env file (as after ``make run``), and
``curl`` fails on any answer of 400 or more: every example must do what it says.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- not run: [^>]+-->\s*$")
README_API = "http://127.0.0.1:8000"
PRELUDE = """set -euo pipefail
curl() { command curl --silent --show-error --fail-with-body --max-time 60 "$@"; echo; }
"""


def shell_examples(text: str) -> list[str]:
    """The README's ```sh blocks that are run (each one's text)."""
    blocks: list[str] = []
    for match in re.finditer(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        if not SKIP.search(text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1] + "\n"):
            blocks.append(match.group(1))
    return blocks


def run_examples(*, api_url: str, env_file: Path, key: str, timeout: float = 120) -> str:
    """Runs them; what they printed. An example that fails raises AssertionError."""
    script = PRELUDE + "\n".join(
        block.replace(README_API, api_url) for block in shell_examples(README.read_text())
    )
    outside = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLINE_")}
    env = {**outside, "FLEETLINE_ENV_FILE": str(env_file), "FLEETLINE_API_KEY": key}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"a README example failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
