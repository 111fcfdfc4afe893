"""``host`` mode, counting half: what one training step asks of the host, per variant and phase.

One profiled step per variant (torch.profiler, CPU activity; on CUDA also the CUDA activity), each
phase inside a ``record_function`` range named ``host|<variant>|<phase>``. From the events:

* **ops**: aten ops that do work, counted once per call from Python or from an autograd node:
  an ``aten::*`` event counts when its name is not in :data:`METADATA_OPS` and no ancestor (its
  ``cpu_parent`` chain) is a counted aten op. So ``aten::linear`` counts once, not again for the
  ``aten::addmm`` inside it, and a no-op ``aten::to``/``aten::reshape`` counts nothing while the
  ``aten::_to_copy``/``aten::clone`` under one that does copy counts once;
* **syncs**: host waits for a device value, by op name (:data:`SYNC_OPS`: ``.item()``, ``bool()``,
  ``float()`` of a tensor reach ``aten::_local_scalar_dense``; ``if tensor:`` ``aten::is_nonzero``),
  the outermost of a nest counted once; a read inside torch's own ``Optimizer.step`` is a read of a
  CPU step count (``host_scalar_reads``), not a sync. On CUDA also with ``torch.cuda.set_sync_debug_mode("warn")``:
  the warnings emitted inside the phase;
* **copies**: blocking host-to-device copies. On the CPU by name: ``aten::lift_fresh``, the op
  ``torch.tensor(python value, device=...)`` ends in, which on a GPU is a pageable copy the host waits
  for. On CUDA by what the device ran: ``Memcpy HtoD`` activities (any ``torch.tensor(...)``,
  ``.to(device)`` of a CPU tensor, ``copy_`` from a CPU tensor);
* **kernels** (CUDA only): device activities other than memcpy/memset. An aten foreach op can be
  several kernels, so kernels and ops differ;
* **collectives**: :class:`.comm_count.CollectiveCounter` (calls and message bytes) around the step.

Phases are assigned by time: an event belongs to the range whose interval holds its start. On CUDA
the backward pass runs in autograd's device thread, whose events have no ``cpu_parent`` link to the
range that the main thread opened; a time interval covers both threads.
"""

from __future__ import annotations

import bisect
import contextlib
import warnings
from collections import Counter
from typing import Any, Callable, Iterator

PHASES = ("forward", "backward", "step")
RANGE_PREFIX = "host|"

METADATA_OPS = frozenset("aten::" + name for name in (
    "view", "view_as", "_unsafe_view", "as_strided", "_reshape_alias", "reshape", "flatten", "unflatten",
    "detach", "detach_", "alias", "expand", "expand_as", "t", "transpose", "permute", "squeeze", "unsqueeze",
    "narrow", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "empty", "empty_like",
    "empty_strided", "resolve_conj", "resolve_neg", "set_", "lift_fresh", "to", "contiguous", "size",
    "stride", "numel", "is_same_size", "requires_grad_", "_has_compatible_shallow_copy_type"))
"""aten ops that only make or describe a tensor header (shape, strides, storage offset) or allocate,
and launch no kernel: their host cost is small and the same on every device, and counting them would
make the op count follow how an op happens to be written (``x.view(...)`` against ``x.reshape(...)``)
rather than the work done. ``to``, ``contiguous`` and ``reshape`` are no-ops on a tensor that already
fits; when they do copy, the copying op under them (``_to_copy``, ``clone``) is counted instead.
``lift_fresh`` is counted as a copy, not an op."""

SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"})
"""Ops that make the host wait for a device value (``item``/``is_nonzero`` call ``_local_scalar_dense``:
a nest of them is one sync)."""

COPY_OPS = frozenset({"aten::lift_fresh"})
"""Ops that, on a GPU, are a blocking host-to-device copy (counted by name on the CPU)."""


def _phase_index(events: list[Any]) -> Callable[[Any], str | None]:
    """A function: event -> ``variant|phase`` label of the range that holds its start (or None)."""
    ranges = sorted((ev.time_range.start, ev.time_range.end, ev.name[len(RANGE_PREFIX):])
                    for ev in events if ev.name.startswith(RANGE_PREFIX))
    starts = [r[0] for r in ranges]

    def label_of(ev: Any) -> str | None:
        i = bisect.bisect_right(starts, ev.time_range.start) - 1
        if i >= 0 and ev.time_range.start <= ranges[i][1]:
            return ranges[i][2]
        return None

    return label_of


def _has_ancestor(ev: Any, names_or_pred: Callable[[str], bool]) -> bool:
    node = ev.cpu_parent
    while node is not None:
        if names_or_pred(node.name):
            return True
        node = node.cpu_parent
    return False


def _is_torch_optimizer_step(name: str) -> bool:
    return name.startswith("Optimizer.step#")  # torch.optim.Optimizer's profiling range around step()


def _is_work(name: str) -> bool:
    return name.startswith("aten::") and name not in METADATA_OPS


def empty_phase() -> dict[str, Any]:
    return {"ops": 0, "op_names": Counter(), "syncs": 0, "host_scalar_reads": 0, "copies": 0, "lift_fresh": 0,
            "kernels": 0, "memcpy_htod": 0, "sync_warnings": 0}


def count_events(events: list[Any], cuda: bool) -> dict[str, dict[str, Any]]:
    """Per ``variant|phase`` label: ops, syncs, copies (and kernels on CUDA) of the profiled events."""
    from torch.autograd import DeviceType

    label_of = _phase_index(events)
    out: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.device_type != DeviceType.CPU or ev.name.startswith(RANGE_PREFIX):
            continue
        label = label_of(ev)
        if label is None:
            continue
        row = out.setdefault(label, empty_phase())
        name = ev.name
        if _is_work(name) and not _has_ancestor(ev, _is_work):
            row["ops"] += 1
            row["op_names"][name] += 1
        if name in SYNC_OPS and not _has_ancestor(ev, SYNC_OPS.__contains__):
            # Inside torch's own Optimizer.step, a scalar read is `_get_value(state["step"])`: torch keeps
            # the step counts of its foreach and for-loop optimizers on the CPU (unless capturable or
            # fused), so on a GPU that read waits for nothing. Counted apart, not as a sync.
            key = "host_scalar_reads" if _has_ancestor(ev, _is_torch_optimizer_step) else "syncs"
            row[key] += 1
        if name in COPY_OPS:
            row["lift_fresh"] += 1
        for k in getattr(ev, "kernels", ()) or ():  # device activities linked to this CPU event (CUDA)
            if k.name.startswith("Memcpy HtoD"):
                row["memcpy_htod"] += 1
            elif not k.name.startswith(("Memcpy", "Memset")):
                row["kernels"] += 1
    for row in out.values():
        # CPU: torch.tensor(value, device=...) by name; CUDA: what the device copied from the host.
        row["copies"] = row["memcpy_htod"] if cuda else row["lift_fresh"]
        row["op_names"] = dict(row["op_names"].most_common())
    return out


@contextlib.contextmanager
def phase(label: str, cuda: bool, sink: dict[str, int]) -> Iterator[None]:
    """One phase of a profiled step: a named range; on CUDA, the sync-debug warnings inside it counted
    into ``sink[label]`` and the device drained before the range closes (its kernels then lie inside)."""
    import torch
    from torch.profiler import record_function

    with record_function(RANGE_PREFIX + label):
        if cuda:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every sync, not once per source line
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            sink[label] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
            torch.cuda.synchronize()  # outside the warning window: the bench's own wait is not counted
        else:
            yield


def profiled_steps(variants: dict[str, Callable[[str], Any]], cuda: bool) -> dict[str, Any]:
    """Run ``variants[name](prefix)`` (one training step each, phases through :func:`phase`) under one
    profiler session and the collective counter; return per variant and phase the counts."""
    from torch.profiler import ProfilerActivity, profile

    from .comm_count import CollectiveCounter

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync_warnings: dict[str, int] = {}
    collectives: dict[str, Any] = {}
    with profile(activities=activities) as prof:
        for name, run_step in variants.items():
            with CollectiveCounter() as comm:
                run_step(name, sync_warnings)
            collectives[name] = {"calls": len(comm.calls), "bytes": sum(c.bytes for c in comm.calls),
                                 "by_kind": comm.summary()}
    counted = count_events(list(prof.events()), cuda)
    out: dict[str, Any] = {}
    for name in variants:
        phases = {p: counted.get(f"{name}|{p}", empty_phase()) for p in PHASES}
        for p, row in phases.items():
            row["sync_warnings"] = sync_warnings.get(f"{name}|{p}", 0)
            if isinstance(row["op_names"], Counter):
                row["op_names"] = dict(row["op_names"])
        out[name] = {"phases": phases, "collectives": collectives[name],
                     **{k: sum(r[k] for r in phases.values())
                        for k in ("ops", "syncs", "host_scalar_reads", "copies", "kernels", "sync_warnings")}}
    return out


__all__ = ["PHASES", "METADATA_OPS", "SYNC_OPS", "COPY_OPS", "count_events", "phase", "profiled_steps"]
