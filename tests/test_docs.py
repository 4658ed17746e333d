"""The docs: generated pages match the code, the README stays short, no link leaves the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 200
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)[^)]*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def test_generated_pages_are_up_to_date(tmp_path):
    written = _generator().generate(tmp_path)
    assert written, "docs/generate.py wrote no pages"
    stale = [p.name for p in written if not (DOCS / p.name).is_file() or (DOCS / p.name).read_text() != p.read_text()]
    assert not stale, f"docs are stale: run `make docs` (differs: {', '.join(stale)})"


def test_generation_is_deterministic(tmp_path):
    generator = _generator()
    first = {p.name: p.read_text() for p in generator.generate(tmp_path / "a")}
    second = {p.name: p.read_text() for p in generator.generate(tmp_path / "b")}
    assert first == second


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the rest into docs/"
    opening = "\n".join(lines[:6])
    assert "make demo" in opening and "make test" in opening


def test_changelog_entries_are_at_most_three_lines():
    long, entry, lines = [], None, 0
    for line in (ROOT / "CHANGELOG.md").read_text().splitlines() + [""]:
        if line.startswith("  ") and entry is not None:
            lines += 1
            continue
        if entry is not None and lines > 3:
            long.append(entry)
        entry, lines = (line[2:60], 1) if line.startswith("- ") else (None, 0)
    assert not long, f"CHANGELOG.md entries over three lines: {long}"


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: p.name)
def test_no_link_leaves_the_repository(path):
    text = path.read_text()
    bad = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            bad.append(f"{target} (outside the repository)")
            continue
        local = target.split("#")[0]
        if not local:
            continue
        resolved = (path.parent / local).resolve()
        if not resolved.is_relative_to(ROOT):
            bad.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file)")
    assert not bad, f"{path.relative_to(ROOT)} links to: {', '.join(bad)}"
