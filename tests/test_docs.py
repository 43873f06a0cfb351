"""The documentation builds (mkdocs, strict) and its generated pages are up to date."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.config.reference import render

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

GENERATED = {
    "markdown": "configuration.md",
    "json": "closedloop-config.schema.json",
    "set-json": "closedloop-set.schema.json",
    "refusals": "refusals.md",
}


@pytest.mark.parametrize(("fmt", "name"), sorted(GENERATED.items()))
def test_generated_reference_is_up_to_date(fmt: str, name: str) -> None:
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == render(fmt), (
        f"docs/{name} is out of date with the schema: run "
        f"`closedloop config-reference --format {fmt} -o docs/{name}`")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (it is in the 'test' extra)")
def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "site" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "trigger.target_phase_deg" in page and "<table>" in page


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def test_every_page_is_in_the_nav_and_the_readme_links_resolve() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    for name in pages:
        assert f": {name}" in nav, f"docs/{name} is not in mkdocs.yml's nav"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    local = [link for link in _links(readme) if not link.startswith("http")]
    assert {Path(link).name for link in local} >= set(pages) - {"index.md"}
    for link in local:
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"


def test_readme_starts_with_the_two_commands() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[:6] == ["# closedloop", "", "```bash", "pip install . && closedloop demo",
                         "pip install -e '.[test]' && python -m pytest", "```"]
