"""The documentation's front door stays short, and every relative link in it, in ARCHITECTURE.md and in
docs/*.md leads to a file or folder that exists (fast: reads text files only)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of a page's links outside code, less web, mail and in-page anchors; a #fragment
    is stripped from a file link."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"(https?|mailto):", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_every_relative_link_in_the_docs_resolves() -> None:
    assert (ROOT / "docs").is_dir() and (ROOT / "ARCHITECTURE.md").is_file()
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages() for target in relative_links(page)
              if not (page.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_finder_finds_links_and_skips_the_rest(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("[a](docs/a.md#part) ![pic](img/x.png) [web](https://x.org) [m](mailto:a@b.c) [in](#here)\n"
                    "`[code](not/a/link.md)`\n```\n[fenced](not/either.md)\n```\n[t](b.md \"title\")\n")
    assert relative_links(page) == ["docs/a.md", "img/x.png", "b.md"]


def test_the_readme_is_at_most_200_lines() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move the detail into docs/"
