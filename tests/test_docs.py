"""The documentation is what the code says: the reference pages are regenerated and compared, the README stays
a front door, and every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from flnode.cli.reference import PAGES

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_reference_pages_match_the_code() -> None:
    for name, render in PAGES.items():
        page = ROOT / "docs" / "reference" / name
        assert page.read_text() == render(), f"{page} is stale: run python -m flnode.cli.reference docs/reference"


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 8 * 1024
    assert "make demo" in text and "make test" in text


def test_relative_links_resolve() -> None:
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_check_table_cites_tests_that_exist() -> None:
    cited = set(re.findall(r"`(tests/[a-z_]+\.py)`", (ROOT / "docs" / "threat-model.md").read_text()))
    assert len(cited) >= 20 and all((ROOT / c).is_file() for c in cited), sorted(c for c in cited
                                                                                 if not (ROOT / c).is_file())
