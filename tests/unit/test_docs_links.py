"""Every relative link in README.md and docs/*.md leads somewhere.

The README was cut to one page and its reference moved into docs/ (issue 17, item 7); sections
moved again later would silently leave dead links behind. So: every relative link points to an
existing file or folder, and every ``#anchor`` names a heading of its target Markdown file, as
GitHub spells heading anchors. Links inside code (fenced blocks, inline code) are not links; web
addresses are not checked (no network in the suite).
"""

from __future__ import annotations

import pathlib
import re
from urllib.parse import unquote

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ')'.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
_EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def _prose(text: str) -> str:
    """The text without code: fenced blocks and inline code spans hold no links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link targets and formatting dropped, lower case,
    punctuation other than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    anchors = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = github_anchor(heading)
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return anchors


def links_of(path: pathlib.Path) -> list[str]:
    """The link targets in a Markdown file's prose, in order."""
    return _LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _shown(path: pathlib.Path) -> str:
    """A path as a reader of the failure wants it: relative to the repository where it lies inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: pathlib.Path) -> list[str]:
    """Each relative link of ``path`` whose file or anchor does not exist, with the reason."""
    problems = []
    for target in links_of(path):
        if target.startswith(_EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no file {_shown(destination)}")
            continue
        if anchor and destination.suffix == ".md" and unquote(anchor) not in anchors_of(destination):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_shown(destination)}")
    return problems


def test_the_anchor_rules_match_githubs():
    """The slug rules on headings of this repository whose GitHub anchors are known."""
    assert github_anchor("Configuration: the `layer_drop_back` section") == "configuration-the-layer_drop_back-section"
    assert github_anchor("Hugging Face Trainer / Accelerate") == "hugging-face-trainer--accelerate"
    assert github_anchor("Second GPU run (after the step-path rewrite), 2026-12-04") == \
        "second-gpu-run-after-the-step-path-rewrite-2026-12-04"
    assert github_anchor("3. How a mask flows, from the config to the optimizer step") == \
        "3-how-a-mask-flows-from-the-config-to-the-optimizer-step"


def test_the_checker_finds_a_dead_link(tmp_path):
    """The check can fail: a missing file, a missing anchor and a link in code (ignored)."""
    (tmp_path / "other.md").write_text("# Present heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#present-heading) [b](missing.md) [c](other.md#absent)\n"
                    "`[d](also-missing.md)`\n```\n[e](missing-too.md)\n```\n## Here\n[f](#here) [g](#nowhere)\n",
                    encoding="utf-8")
    problems = broken_links(page)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "other.md#absent", "#nowhere"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert links_of(path) or path.name != "README.md", "the README links to its documentation"
    assert broken_links(path) == []
