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


# --------------------------------------------------------------------------- docs/design.md's names

DESIGN = ROOT / "docs" / "design.md"
PACKAGE = ROOT / "ldb_ds"
# `ldb_ds/...py` in backticks, and dotted names in backticks: `ldb_ds.x.y`, or `zero_hooks.x`,
# `setup.prepare`, ... (a core module or package of ldb_ds, or a module of ldb_ds.zero_hooks).
_PATH = re.compile(r"`(ldb_ds/[\w/]+\.py)`")
_DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`")
# Code comments cite this file as "docs/design.md, section N" (also "sections N and M", and
# "docs/design.md (section N)"), possibly across a line break.
_CITATION = re.compile(r"design\.md,?\s*(?:#\s*)?\(?sections?\s+(\d+)(?:\s+and\s+(\d+))?")


def _first_parts() -> dict[str, str]:
    """The first component of a dotted name the doc may use for ldb_ds code, and its module prefix.

    ``engine`` is left out: in the doc ``engine.x`` is a user's engine object (``engine.set_epoch``)
    or DeepSpeed's ``engine.py``, not the module ``ldb_ds.engine``.
    """
    parts = {p.stem: f"ldb_ds.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts.update({p.name: f"ldb_ds.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()})
    parts.update({p.stem: f"ldb_ds.zero_hooks.{p.stem}" for p in (PACKAGE / "zero_hooks").glob("*.py")
                  if p.stem != "__init__"})
    parts.pop("engine", None)
    for deprecated in ("guards", "safety", "runtime"):  # old names: the doc must cite the new modules
        parts.pop(deprecated, None)
    parts["ldb_ds"] = "ldb_ds"
    return parts


def cited_paths(text: str) -> list[str]:
    return sorted(set(_PATH.findall(_FENCE.sub("", text))))


def cited_names(text: str, first_parts: dict[str, str]) -> list[str]:
    """Dotted names of ldb_ds code in backticks, written out from ``ldb_ds`` (``setup.prepare`` ->
    ``ldb_ds.setup.prepare``); names that start with anything else (DeepSpeed's, config keys) are not
    ldb_ds's and are left out."""
    names = set()
    for name in _DOTTED.findall(_FENCE.sub("", text)):
        head, _, rest = name.partition(".")
        if head in first_parts:
            names.add(f"{first_parts[head]}.{rest}" if head != "ldb_ds" else name)
    return sorted(names)


def resolve(name: str) -> bool:
    """Whether ``ldb_ds.a.b.c`` is a module, or an attribute reached from the longest importable module."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def section_numbers(path: pathlib.Path) -> set[int]:
    """The numbers of ``## N. ...`` headings."""
    return {int(n) for n in re.findall(r"^## (\d+)\. ", path.read_text(encoding="utf-8"), re.M)}


def design_citations(root: pathlib.Path) -> list[tuple[str, int]]:
    """(file:line, section) of every "design.md, section N" citation in the ``.py`` files under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in _CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found += [(f"{_shown(path)}:{line}", int(n)) for n in m.groups() if n]
    return found


def test_the_name_checks_can_fail(tmp_path):
    """A missing file, a missing attribute, a section that does not exist: each is found."""
    parts = _first_parts()
    text = ("`ldb_ds/no_such_module.py` `ldb_ds/setup.py` `zero_hooks.no_such_name` `setup.prepare` "
            "`engine.set_epoch(e)` `deepspeed.initialize` `controller.StepState`\n```\n`ldb_ds/in_code.py`\n```\n")
    assert cited_paths(text) == ["ldb_ds/no_such_module.py", "ldb_ds/setup.py"]
    assert cited_names(text, parts) == ["ldb_ds.controller.StepState", "ldb_ds.setup.prepare",
                                        "ldb_ds.zero_hooks.no_such_name"]
    assert [resolve(n) for n in cited_names(text, parts)] == [True, True, False]
    (tmp_path / "m.py").write_text('"""See docs/design.md, section 4; also docs/design.md,\nsection 12 and\n'
                                   'docs/design.md, sections 2 and 3."""\n', encoding="utf-8")
    assert [s for _, s in design_citations(tmp_path)] == [4, 12, 2, 3]


def test_design_cites_files_that_exist():
    missing = [p for p in cited_paths(DESIGN.read_text(encoding="utf-8")) if not (ROOT / p).is_file()]
    assert cited_paths(DESIGN.read_text(encoding="utf-8")), "design.md names ldb_ds's files"
    assert missing == [], f"docs/design.md cites files that do not exist: {missing}"


def test_design_cites_names_that_resolve():
    names = cited_names(DESIGN.read_text(encoding="utf-8"), _first_parts())
    assert len(names) > 20, "design.md names ldb_ds's functions"
    unresolved = [n for n in names if not resolve(n)]
    assert unresolved == [], f"docs/design.md cites names that do not resolve: {unresolved}"


def test_code_cites_design_sections_that_exist():
    sections = section_numbers(DESIGN)
    assert sections == set(range(1, max(sections) + 1)), f"design.md's sections are numbered 1..N: {sections}"
    citations = [c for folder in ("ldb_ds", "tests", "scripts") for c in design_citations(ROOT / folder)
                 if "test_docs_links.py" not in c[0]]
    assert citations, "the code cites design.md by section"
    assert [c for c in citations if c[1] not in sections] == []
