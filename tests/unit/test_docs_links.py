"""Every relative link in README.md and docs/**/*.md resolves: the file or folder exists inside the repository, and
an `#anchor` (same page, or `page.md#anchor`) names a heading of its target by GitHub's slug rule (lower-case,
punctuation other than `-` and `_` dropped, spaces to `-`, `-1`, `-2`, ... for repeats). External links (http, https,
mailto) are not checked. Links inside code spans and fenced code blocks are not links."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page defines: its headings' slugs (repeats numbered) and explicit HTML anchors."""
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    found.update(HTML_ANCHOR.findall(path.read_text(encoding="utf-8")))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition on the page."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        found += [(number, t.strip("<>")) for t in targets]
    return found


def broken(page: Path, target: str) -> str | None:
    """Why `target` (a link on `page`) does not resolve, or None."""
    if EXTERNAL.match(target):
        return None
    file_part, _, anchor = target.partition("#")
    resolved = (page.parent / unquote(file_part)).resolve() if file_part else page
    if resolved != REPO and REPO not in resolved.parents:
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or folder"
    if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
        return f"no heading with anchor #{anchor} in {resolved.relative_to(REPO)}"
    return None


def test_slug_follows_github():
    assert slug("Train on your own data") == "train-on-your-own-data"
    assert slug("Planning figures: the 7B step") == "planning-figures-the-7b-step"
    assert slug("The [EMB] read-out and the losses") == "the-emb-read-out-and-the-losses"
    assert slug("`notellm_jax` and **bold**, too!") == "notellm_jax-and-bold-too"
    assert slug("See [the data](data.md) page") == "see-the-data-page"


def test_links_are_found_and_judged(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Title here\n\n## Same\n\n## Same\n\n[x](b.md#other) [y](#same-1) [z](#nope)\n"
                                   "`[not](a link)`\n```\n[also not](missing.md)\n```\n[w](missing.md)\n")
    (tmp_path / "b.md").write_text("# Other\n")
    page = tmp_path / "a.md"
    verdicts = {t: broken(page, t) for _, t in links(page)}
    assert verdicts == {"b.md#other": None, "#same-1": None, "#nope": "no heading with anchor #nope in a.md",
                        "missing.md": "no such file or folder"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    bad = [f"{page.relative_to(REPO)}:{line}: ({target}) {why}"
           for line, target in links(page) if (why := broken(page, target))]
    assert not bad, "broken links:\n" + "\n".join(bad)
