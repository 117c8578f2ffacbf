"""The documentation's links hold: every relative link in the project's Markdown names a file
that exists, and every `#anchor` names a heading of its page, by GitHub's rule for heading
ids; and every `docs/*.md` page that code, configuration or CI mentions exists.

GitHub's heading ids (github-slugger, which github.com and most Markdown renderers follow):
the heading's text lower-cased, every character that is not a letter, digit, `_`, `-` or
space removed, each space turned into `-`; a repeated id gets `-1`, `-2`, ... in order."""

from __future__ import annotations

import os
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The project's own folders; a virtual environment or a run folder inside the checkout holds
# other projects' Markdown, which is not ours to check.
MARKDOWN_FOLDERS = ("docs", "weights", "benchmarks", "deploy", "model", "service", "examples")
# Where code, configuration and CI may point a reader at a page of docs/.
MENTION_GLOBS = (
    "model/**/*.py",
    "service/**/*.py",
    "benchmarks/**/*.py",
    "deploy/**/*",
    "tests/**/*.py",
    "scripts/*",
    "Dockerfile",
    "docker-compose*.yml",
    ".ci/run",
    "pyproject.toml",
)

_PARSER = MarkdownIt("commonmark").enable("table")


def _markdown_files() -> list[Path]:
    files = sorted(PROJECT_ROOT.glob("*.md"))
    for folder in MARKDOWN_FOLDERS:
        files += sorted((PROJECT_ROOT / folder).rglob("*.md"))
    return files


def _plain_text(inline: Token) -> str:
    """A heading's text as GitHub slugs it: text and code spans, without the markup."""
    return "".join(
        child.content for child in inline.children or [] if child.type in ("text", "code_inline")
    )


def github_slug(text: str) -> str:
    """The id GitHub gives a heading with this text (before de-duplication)."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of every heading of a Markdown file, de-duplicated as GitHub does."""
    tokens = _PARSER.parse(path.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    ids = set()
    for opening, inline in pairwise(tokens):
        if opening.type != "heading_open":
            continue
        slug = github_slug(_plain_text(inline))
        ids.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return ids


def links(path: Path) -> list[str]:
    """Every link and image target of a Markdown file (code spans and blocks hold none)."""
    targets = []
    for token in _PARSER.parse(path.read_text(encoding="utf-8")):
        for child in token.children or []:
            if child.type == "link_open":
                targets.append(str(child.attrs["href"]))
            elif child.type == "image":
                targets.append(str(child.attrs["src"]))
    return targets


def broken_links(path: Path) -> list[str]:
    """The relative links of one Markdown file that name no file or no heading, explained."""
    broken = []
    for target in links(path):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue  # another site: not checked here (no network in the tests)
        linked = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if not linked.exists():
            broken.append(f"{target}: no file {os.path.relpath(linked, PROJECT_ROOT)}")
        elif parts.fragment and linked.suffix == ".md" and parts.fragment not in anchors(linked):
            broken.append(f"{target}: no heading with id #{parts.fragment} in {linked.name}")
    return broken


def test_the_slug_rule_matches_githubs_ids() -> None:
    """Ids as github.com renders them for headings of this project's pages."""
    assert (
        github_slug("Limits: work and memory per request") == "limits-work-and-memory-per-request"
    )
    assert github_slug("INT8 (OpenVINO, --precision int8)") == "int8-openvino---precision-int8"
    assert (
        github_slug("Inference engines, model only (python -m benchmarks.engines)")
        == "inference-engines-model-only-python--m-benchmarksengines"
    )


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading\n\n## Twice\n\n## Twice\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-code-heading) [ok](other.md#twice-1) [ok](#page)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [self](#nowhere)\n"
        "`[not a link](missing.md)` [web](https://example.com/x.md#y)\n"
    )
    found = broken_links(page)
    assert len(found) == 3, found
    assert found[0].startswith("missing.md: no file")
    assert "#nowhere in other.md" in found[1] and "#nowhere in page.md" in found[2]


@pytest.mark.parametrize(
    "page", _markdown_files(), ids=lambda path: str(path.relative_to(PROJECT_ROOT))
)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_that_code_mentions_exists() -> None:
    mentioned: dict[str, set[str]] = {}
    for pattern in MENTION_GLOBS:
        for path in PROJECT_ROOT.glob(pattern):
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for page in re.findall(r"\bdocs/[\w-]+\.md\b", text):
                mentioned.setdefault(page, set()).add(str(path.relative_to(PROJECT_ROOT)))
    missing = {
        page: files for page, files in mentioned.items() if not (PROJECT_ROOT / page).exists()
    }
    assert missing == {}
