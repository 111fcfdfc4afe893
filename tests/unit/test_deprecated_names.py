"""Renamed modules keep their old name for one release (issue 17, item 6): a warning, the same objects.

``ldb_ds.guards`` is now ``ldb_ds.refusals`` (set-up refusals), ``ldb_ds.safety`` is
``ldb_ds.runtime_checks`` (checks while training) and ``ldb_ds.runtime`` is ``ldb_ds.process``
(the process bootstrap). Importing an old name warns with a ``DeprecationWarning`` that names the
new module and points at the importing line; every public name is the new module's own object,
so ``except ldb_ds.guards.LDBUnsupportedError`` still catches what ldb_ds raises. Nothing in the
repository itself imports an old name.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys
import warnings

import pytest

import ldb_ds

ROOT = pathlib.Path(__file__).resolve().parents[2]
RENAMED = {"guards": "refusals", "safety": "runtime_checks", "runtime": "process"}


def _forget(old: str) -> None:
    """Make the next import of ``ldb_ds.<old>`` run the module again (and warn again)."""
    sys.modules.pop(f"ldb_ds.{old}", None)
    vars(ldb_ds).pop(old, None)


def _deprecations(caught: list[warnings.WarningMessage], old: str) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, DeprecationWarning) and f"ldb_ds.{old} " in str(w.message)]


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_module_name_warns_naming_the_new_one(old):
    _forget(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        __import__(f"ldb_ds.{old}")  # a plain import statement, from this file
    found = _deprecations(caught, old)
    assert len(found) == 1, [str(w.message) for w in caught]
    assert f"ldb_ds.{RENAMED[old]} " in str(found[0].message)
    assert found[0].filename == __file__, "the warning should point at the line that imports the old name"


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_module_name_gives_the_same_objects(old):
    new = importlib.import_module(f"ldb_ds.{RENAMED[old]}")
    _forget(old)
    with pytest.warns(DeprecationWarning, match=rf"ldb_ds\.{old} .*ldb_ds\.{RENAMED[old]} "):
        alias = importlib.import_module(f"ldb_ds.{old}")
    assert list(alias.__all__) == list(new.__all__)
    for name in new.__all__:
        assert getattr(alias, name) is getattr(new, name), name


def test_old_names_through_the_package_still_work():
    from ldb_ds import refusals

    _forget("guards")
    with pytest.warns(DeprecationWarning, match=r"ldb_ds\.guards .*ldb_ds\.refusals "):
        guards = ldb_ds.guards  # attribute access: ldb_ds.__getattr__ imports the alias
    assert guards.LDBUnsupportedError is refusals.LDBUnsupportedError is ldb_ds.LDBUnsupportedError
    with pytest.raises(guards.LDBUnsupportedError):  # what ldb_ds raises is caught under the old name
        refusals.refuse_engine_compile()
    _forget("runtime")
    with pytest.warns(DeprecationWarning, match=r"ldb_ds\.runtime .*ldb_ds\.process "):
        from ldb_ds.runtime import free_port
    assert free_port is ldb_ds.process.free_port


def _imported(path: pathlib.Path) -> set[str]:
    """The modules a file imports (``from pkg import name`` also as ``pkg.name``; relative ones resolved)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_nothing_here_imports_an_old_name():
    old_names = {f"ldb_ds.{old}" for old in RENAMED}
    aliases = {ROOT / "ldb_ds" / f"{old}.py" for old in RENAMED} | {pathlib.Path(__file__)}
    files = [p for folder in ("ldb_ds", "tests", "launch", "examples", "scripts") for p in (ROOT / folder).rglob("*.py")
             if p not in aliases]
    wrong = sorted(f"{p.relative_to(ROOT)}: {name}" for p in files for name in _imported(p) & old_names)
    assert not wrong, f"use the new module names: {wrong}"
    assert _imported(ROOT / "ldb_ds" / "guards.py") & {"ldb_ds.refusals"}  # the check reads relative imports
