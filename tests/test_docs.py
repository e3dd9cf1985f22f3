"""The docs a user reads: a README of one screenful, an API page that names every public
name, and links that lead somewhere."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = (
    "stitchops",
    "stitchops.nn",
    "stitchops.models",
    "stitchops.spt",
    "stitchops.spvit",
    "stitchops.train",
)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 180, len(lines)


def test_every_public_name_is_on_the_api_page():
    page = (ROOT / "docs" / "api.md").read_text()
    headings = set(re.findall(r"^### `(\w+)", page, flags=re.M))
    missing = [
        f"{m}.{name}"
        for m in PUBLIC
        for name in importlib.import_module(m).__all__
        if name not in headings
    ]
    assert not missing, f"not on docs/api.md (run python docs/make_api.py): {missing}"


def test_relative_links_resolve():
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md",
    ]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
