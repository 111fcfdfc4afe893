"""The ``ldb-bench`` command line, generated from the typed options of :mod:`.bench_options`.

Every command-line flag is a dataclass field there: its type gives the argparse type (``bool`` a
switch, with a ``--no-`` form when it defaults to on; ``Literal`` the choices; ``tuple[int, ...]``
a comma-separated list; ``list[str]`` a repeatable flag; ``X | None`` an optional value), its
default is the one default, and its attribute docstring is the ``--help`` text. The LayerDropBack
flags are generated from :class:`ldb_ds.config.LDBConfig` itself (``--drop-rate``,
``--sampling-rate``, ...; the seed is ``--ldb-seed``), so the benchmark can override any
``layer_drop_back`` key and its help is the config's own docstring. Nothing is listed twice.
:func:`parse` turns ``argv`` into :class:`~.bench_options.BenchOptions`; a bad value is one
``ldb-bench: error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
from typing import Any, Literal, NoReturn, Sequence, Union, get_args, get_origin, get_type_hints

from ..config import DEFAULTS, LDBConfig, LDBConfigError
from .bench_options import ALL, ALONE, GROUPS, MODES, BenchOptions, fail, flag_of

DESCRIPTION = ("Benchmark LayerDropBack against the DeepSpeed baseline, side by side in one run "
               "(docs/benchmark.md).")
LDB_FLAGS = {"seed": "--ldb-seed"}
"""``layer_drop_back`` keys whose flag is not ``--<key>`` (``--seed`` is the model seed)."""
LDB_EXCLUDED = ("enabled",)
"""Keys not offered: the benchmark itself turns LDB on for one side and off for the other."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string right under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _csv(elem: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(elem(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {elem.__name__} values, got {text!r}")
    parse.__name__ = f"comma-separated {elem.__name__}"
    return parse


def _show(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return repr(default) if isinstance(default, str) else str(default)


def argument_for(tp: Any, default: Any, doc: str, name: str, optional_default: bool = False) -> dict[str, Any]:
    """argparse keyword arguments for a field of type ``tp`` (see the module docstring)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(tp), get_args(tp)
    doc = doc.replace("%", "%%")
    empty = default is None or default is False or default == [] or default == ""
    shown = "" if empty and not optional_default else f" (default: {_show(default)})"
    if optional_default:
        shown = f" (default: the layer_drop_back default, {_show(default)})"
        default = None
    kwargs: dict[str, Any] = {"default": default, "help": doc + shown, "metavar": name.upper()}
    if tp is bool and not optional_default:  # a switch; one that defaults to on gets a --no- form
        action = argparse.BooleanOptionalAction if default else "store_true"
        kwargs = {"action": action, "default": default, "help": kwargs["help"]}
    elif origin is Literal:
        kwargs.update(type=type(args[0]), choices=args, metavar="{" + ",".join(str(a) for a in args) + "}")
    elif origin is tuple:
        kwargs.update(type=_csv(args[0]), metavar=f"{args[0].__name__.upper()}[,...]")
    elif origin is list:
        kwargs.update(action="append", type=args[0], default=[])
    elif tp is bool:  # an optional LDB bool: --key true/false
        kwargs.update(type=lambda s: s.lower() in ("1", "true", "yes"), metavar="{true,false}")
    elif tp in (int, float, str):
        kwargs.update(type=tp)
    else:
        raise TypeError(f"no command-line form for a field of type {tp!r}")
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    """The ``ldb-bench`` parser, generated from :data:`GROUPS` and :class:`LDBConfig`."""
    p = _Parser(prog="ldb-bench", description=DESCRIPTION)
    p.add_argument("mode", help=f"comma-separated list of: {', '.join(MODES)}; or 'all' ({','.join(ALL)})")
    p.add_argument("report_dirs", nargs="*", help="report mode: directories holding result JSON files")
    for key, cls in GROUPS.items():
        group = p.add_argument_group((cls.__doc__ or key).strip())
        hints, docs = get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(flag_of(f.name), dest=f"{key}.{f.name}",
                               **argument_for(hints[f.name], default, docs.get(f.name, ""), f.name))
    group = p.add_argument_group("LayerDropBack (the layer_drop_back section of the LDB side)")
    hints, docs = get_type_hints(LDBConfig), field_docs(LDBConfig)
    for f in dataclasses.fields(LDBConfig):
        if f.name not in LDB_EXCLUDED:
            group.add_argument(LDB_FLAGS.get(f.name, flag_of(f.name)), dest=f"ldb.{f.name}",
                               **argument_for(hints[f.name], f.default, docs.get(f.name, ""), f.name,
                                              optional_default=True))
    # The deepspeed launcher appends --local_rank=N to the module's arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_modes(text: str) -> list[str]:
    if text == "all":
        return list(ALL)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        fail(f"unknown mode(s) {', '.join(bad) or repr(text)}; expected {', '.join(MODES)} or 'all'")
    if any(m in ALONE for m in modes) and len(modes) > 1:
        fail(f"{' and '.join(repr(m) for m in ALONE)} run alone")
    return modes


def parse(argv: Sequence[str]) -> BenchOptions:
    """Parse ``argv`` into typed options (a bad value exits with status 2 and one line naming the flag)."""
    ns = vars(build_parser().parse_args(list(argv)))
    for dest, value in ns.items():  # before any check below: NaN passes every `< minimum` comparison
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            name = dest.split(".", 1)[-1]
            fail(f"{LDB_FLAGS.get(name, flag_of(name)) if dest.startswith('ldb.') else flag_of(name)} "
                 f"= {value!r} is not allowed: expected finite numbers")
    groups = {key: cls(**{f.name: ns[f"{key}.{f.name}"] for f in dataclasses.fields(cls)})
              for key, cls in GROUPS.items()}
    ldb = {f.name: ns[f"ldb.{f.name}"] for f in dataclasses.fields(LDBConfig)
           if f.name not in LDB_EXCLUDED and ns[f"ldb.{f.name}"] is not None}
    try:  # the layer_drop_back section's own checks, now rather than after the process group starts
        LDBConfig.from_dict({**DEFAULTS.to_dict(), **ldb})
    except LDBConfigError as err:
        fail(str(err))
    return BenchOptions(modes=parse_modes(ns["mode"]), report_dirs=list(ns["report_dirs"]), ldb=ldb, **groups)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (argparse prints the whole usage first: 60 lines here)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see ldb-bench --help)")


__all__ = ["DESCRIPTION", "LDB_FLAGS", "LDB_EXCLUDED", "field_docs", "argument_for", "build_parser", "parse_modes",
           "parse"]
