"""The README is a front door and docs/ a manual: every relative link in them resolves, and the README stays short.

A link is `[text](path)` or `![alt](path)`, optionally with `#anchor`. The path must name an existing file or folder,
relative to the page that links; an anchor into a Markdown page (or into the same page) must name one of its headings,
slugged as GitHub does (lowercase, spaces to hyphens, punctuation other than - and _ dropped, repeats numbered).
http(s) and mailto links are not checked (no network in tests). Code blocks and inline code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
SHORT_DESCRIPTION_MAX = 60  # the Hub's limit for a Space card's short_description

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str, blank_code: bool = True) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans blanked out unless told otherwise."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "``", line) if blank_code else line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lowercased, punctuation other than - and _ dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8"), blank_code=False):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Every relative link of `page` that names no file, or a heading its target page does not have."""
    problems = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"(?i)^(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no such file {path}")
            elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the manual in docs/ takes the rest"
    assert lines[0] == "---", "README.md opens with the Hugging Face Space card's front matter"
    card = lines[1:lines.index("---", 1)]
    short = next(line.split(":", 1)[1].strip() for line in card if line.startswith("short_description:"))
    assert len(short) <= SHORT_DESCRIPTION_MAX, f"the Hub refuses a short_description over 60 characters: {short!r}"


def test_the_checker_can_fail(tmp_path: Path) -> None:
    """A broken file link, a missing heading and a missing same-page anchor are all reported; good links are not."""
    (tmp_path / "other.md").write_text("# A heading, with `code` & punctuation\n\n## Twice\n\n## Twice\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n"
        "[ok](other.md) [ok](other.md#a-heading-with-code--punctuation) [ok](other.md#twice-1) ![ok](pic.png)\n"
        "[ok](#top) [web](https://example.org/missing) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[bad](missing.md) ![bad](gone.png) [bad](other.md#no-such-heading) [bad](#nowhere)\n"
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert {p.split("(")[1].split(")")[0] for p in problems} == {
        "missing.md", "gone.png", "other.md#no-such-heading", "#nowhere"}
