"""The README and every other Markdown file of the repository link only inside the
repository, every link resolves, and none names a path of the machine it was written on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / name for name in subprocess.run(
    ["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
).stdout.split("\0") if name]
# [text](target) and <target>, code spans left out (they may show link syntax).
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    text = CODE.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    for outside in ("../shared", "PROTOCOL.md", "ARCHITECTURE.md", "FACTS.md", "STYLE.md"):
        assert outside not in text, f"{doc.name} refers to {outside}"
    assert str(ROOT) not in text, f"{doc.name} names this checkout's path"


def test_every_markdown_file_is_checked() -> None:
    assert {ROOT / "README.md", ROOT / "docs" / "protocol.md", ROOT / "bench" / "README.md",
            ROOT / "firmware" / "README.md"} <= set(DOCS), DOCS
