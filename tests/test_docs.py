"""The documentation stands alone: README.md, docs/*.md and docs/results/*.md never point
readers outside the repository (no ``../shared``) and every relative Markdown link reaches a file
that exists, and, where it names a heading of a Markdown file, a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "docs" / "results").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ')' (a title may follow)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_links(text: str) -> list[str]:
    """Link targets outside code blocks and code spans (code may hold ``[a](b)`` literally)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation other than '-' and '_'
    dropped, spaces to '-', and '-1', '-2', ... for repeats."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in markdown_links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto: and in-page anchors are not files
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve()
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif ROOT not in (resolved, *resolved.parents):
            problems.append(f"{target}: outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(
                resolved.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


def test_the_checks_catch_what_they_are_for():
    # Prepare: a page with a good link, a missing file, a missing heading, code that looks
    # like a link, and links that are not files
    text = ("See [docs](docs/README.md) and [gone](docs/nope.md) and [bad](README.md#no-such).\n"
            "`[not](a/link.md)` [web](https://arxiv.org/abs/2502.01755) [here](#top)\n"
            "```\n[fenced](missing.md)\n```\n")

    # Execute
    links = markdown_links(text)

    # Assert
    assert links == ["docs/README.md", "docs/nope.md", "README.md#no-such",
                     "https://arxiv.org/abs/2502.01755", "#top"]
    assert heading_anchors("# A `b` (c)\n## A `b` (c)\n### LoRA-FAIR (`lorafair`)\n") == {
        "a-b-c", "a-b-c-1", "lora-fair-lorafair"}


def test_the_docs_exist():
    # Assert: the pages the README links to are there
    names = {page.name for page in PAGES if page.parent.name == "docs"}
    assert {"README.md", "algorithms.md", "privacy.md", "deployment.md", "results.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    # Execute
    text = page.read_text(encoding="utf-8")

    # Assert: users who clone fedlora have no ../shared
    assert "../shared" not in text and "shared/" not in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    # Execute
    problems = broken_links(page)

    # Assert
    assert problems == [], f"{page.relative_to(ROOT)}: {problems}"


def test_configuration_page_lists_the_generated_keys():
    # Prepare: the table the settings dataclasses generate
    from fedlora.run.cli import keys_markdown

    page = (ROOT / "docs" / "configuration.md").read_text()

    # Execute
    shown = page.split("<!-- keys:start -->\n", 1)[1].split("\n<!-- keys:end -->", 1)[0]

    # Assert: regenerate with `python -m fedlora.run.cli keys` when a setting changes
    assert shown == keys_markdown()
