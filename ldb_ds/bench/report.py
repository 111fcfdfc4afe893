"""Writers for the benchmark's results: JSON, Markdown tables, PNG plots, TensorBoard scalars.

Measuring lives in the mode modules; this one turns a result dict into files, so a result can be
re-rendered later (``python -m ldb_ds.bench report DIR``) without re-measuring. The Markdown body,
the plot and the scalars of each mode come from the module named in :data:`RENDERERS`
(``markdown(result)``, ``plot(result, path)``, ``scalars(result)``).

Every result is one JSON object with the same top-level keys (schema ``ldb_ds.bench/1``):

``schema``, ``mode``        the schema tag and the mode that produced it;
``conditions``              machine, device, world size, model, batch, precision, ZeRO stage,
                            LDB settings, versions, command line (printed with every table);
``results``                 the mode's own figures (see docs/benchmark.md);
``notes``                   sentences that belong next to the figures (e.g. the shared machine).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Any, Iterable, Sequence

SCHEMA = "ldb_ds.bench/1"
RENDERERS = {"step": "render", "epochs": "render", "sweep-drop-rate": "render", "sweep-sampling-rate": "render",
             "accuracy": "render", "scaling": "render", "counts": "counts", "project": "project",
             "host": "host_render"}
"""The module that renders each mode."""
PAPER = {
    # Paper, Table 3 (MobileNetV2, CIFAR-100): GPUs -> speedup (time saved, %).
    "table3_scaling": {1: 7.0, 2: 18.1, 4: 21.0, 8: 24.5},
    # Paper, Table 4 (ResNet-50, CIFAR-100): sampling rate -> speedup (%).
    "table4_sampling_rate": {1: 49.3, 2: 23.8, 3: 14.3, 4: 12.3, 5: 10.2, 6: 7.6, 7: 6.5, 8: 5.3},
    # Paper, Figure 3 (DLA, CIFAR-10): only the drop rates quoted in the text.
    "figure3_drop_rate": {0.1: 23.3, 0.3: 23.6, 0.8: 25.7},
}


# --------------------------------------------------------------------------- statistics


def stats(values: Iterable[float]) -> dict[str, float]:
    """Median, quartiles, min, max, mean and count of ``values`` (empty -> NaNs, n = 0)."""
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        nan = float("nan")
        return {"median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan, "mean": nan, "n": 0}

    def q(f: float) -> float:  # linear interpolation, as numpy's default
        pos = f * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"median": q(0.5), "q1": q(0.25), "q3": q(0.75), "min": v[0], "max": v[-1],
            "mean": sum(v) / n, "n": n}


# --------------------------------------------------------------------------- files


def write_json(result: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=_jsonable)
    return path


def read_json(path: str) -> dict[str, Any]:
    """A benchmark result; ``ValueError`` naming ``path`` for anything else (another JSON, not JSON)."""
    with open(path) as f:
        result = json.load(f)
    if not isinstance(result, dict):
        raise ValueError(f"{path} is not a benchmark result (a JSON {type(result).__name__}, not an object)")
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a benchmark result (schema {result.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    return result


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_all(result: dict[str, Any], out_dir: str, stem: str | None = None,
              tensorboard: bool = True) -> dict[str, str]:
    """JSON + Markdown + PNG (+ TensorBoard) of one result; returns the paths written."""
    stem = stem or result["mode"]
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": write_json(result, os.path.join(out_dir, f"{stem}.json"))}
    md = markdown(result)
    paths["md"] = os.path.join(out_dir, f"{stem}.md")
    with open(paths["md"], "w") as f:
        f.write(md)
    png = plot(result, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    if tensorboard:
        tb = write_tensorboard(result, os.path.join(out_dir, "tb", stem))
        if tb:
            paths["tensorboard"] = tb
    return paths


# --------------------------------------------------------------------------- markdown


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def spread(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """'median [q1, q3]' of a stats dict, scaled (e.g. to ms or %)."""
    if not s or not s.get("n"):
        return "-"
    return (f"{s['median'] * scale:.{digits}f} [{s['q1'] * scale:.{digits}f}, "
            f"{s['q3'] * scale:.{digits}f}]")


def minmax(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f} .. {s['max'] * scale:.{digits}f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(lines) + "\n"


def conditions_line(c: dict[str, Any]) -> str:
    ldb = c.get("ldb", {})
    return (f"Conditions: {c.get('device')} ({c.get('cpu_model')}, {c.get('cpu_cores')} cores, "
            f"{c.get('threads_per_rank')} thread(s)/rank), backend {c.get('backend')}, world size "
            f"{c.get('world_size')}, model {c.get('model')} ("
            + (f"{c['params_m']:.2f} M params, " if c.get("params_m") else "")
            + f"{c.get('img_size')}px), micro batch {c.get('micro_batch_per_rank')}/rank, precision "
            f"{c.get('precision')}, ZeRO-{c.get('zero_stage')}, LDB p={ldb.get('drop_rate')} "
            f"s={ldb.get('sampling_rate')} kappa={ldb.get('kappa')} batch_kappa={ldb.get('batch_kappa')} "
            f"granularity={ldb.get('granularity')} keep_first={ldb.get('keep_first')} "
            f"keep_last={ldb.get('keep_last')}; deepspeed {c.get('versions', {}).get('deepspeed')}, "
            f"torch {c.get('versions', {}).get('torch')}; {c.get('timestamp')}.\n")


def renderer(mode: str) -> Any:
    if mode not in RENDERERS:
        raise ValueError(f"no renderer for benchmark mode {mode!r}; known: {', '.join(RENDERERS)}")
    return importlib.import_module(f"{__package__}.{RENDERERS[mode]}")


def markdown(result: dict[str, Any]) -> str:
    mode = result["mode"]
    out = [f"### ldb_ds benchmark: {mode}\n\n", conditions_line(result["conditions"]), "\n",
           renderer(mode).markdown(result)]
    for note in result.get("notes", []):
        out.append(f"\n> {note}\n")
    out.append(f"\nCommand: `{result['conditions'].get('command', '')}`\n")
    return "".join(out)


def fmt_count(x: Any) -> str:
    """An integer count, or a mean of counts with one decimal."""
    if x is None:
        return "-"
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


# --------------------------------------------------------------------------- plots and scalars


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict[str, Any], path: str) -> str | None:
    return renderer(result["mode"]).plot(result, path)


def save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def tensorboard_scalars(result: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) triples for one result; tags are namespaced ``bench/<mode>/...``."""
    out = renderer(result["mode"]).scalars(result)
    return [(t, float(v), int(s)) for t, v, s in out if v is not None and not math.isnan(float(v))]



def write_tensorboard(result: dict[str, Any], log_dir: str) -> str | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the other outputs still exist
        return None
    writer = SummaryWriter(log_dir=log_dir)
    try:
        for tag, value, step in tensorboard_scalars(result):
            writer.add_scalar(tag, value, step)
        writer.add_text(f"bench/{result['mode']}/conditions", conditions_line(result["conditions"]), 0)
    finally:
        writer.close()
    return log_dir


__all__ = ["SCHEMA", "PAPER", "RENDERERS", "stats", "write_json", "read_json", "write_all", "markdown", "plot",
           "tensorboard_scalars", "write_tensorboard", "conditions_line", "table", "fmt", "fmt_count", "spread",
           "minmax", "pyplot", "save", "renderer"]
