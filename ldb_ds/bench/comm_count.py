"""Exact counts of what DeepSpeed (and ldb_ds) hand to collectives.

Used by the benchmark and the tests to *count* (not estimate) communication:
``with ReductionCounter() as counter: ...; counter.bytes`` (gradient bytes), and
``with CollectiveCounter() as c: ...; c.summary()`` (every collective, by kind).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..zero_hooks import NOT_A_GRADIENT


class ReductionCounter:
    """Counts bytes handed to gradient *reductions* by DeepSpeed's communication backend.

    Every DeepSpeed collective goes through the backend object
    ``deepspeed.comm.comm.cdb`` (ZeRO-3 even keeps its own reference to torch's
    reduce_scatter_tensor, so wrapping torch.distributed would miss it). We wrap
    that object's reduction methods: real traffic, counted, not changed.
    Reductions of fewer than ``MIN_NUMEL`` (16) elements are scalar norm/overflow
    checks, not gradients, and are not counted; nor is ldb_ds's own batched
    gradient-norm vector (one element per group, so possibly longer), which
    ``zero_hooks`` marks with the attribute named ``zero_hooks.NOT_A_GRADIENT``.
    """

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced", "reduce",
             "inference_all_reduce")

    MIN_NUMEL = 16

    def __init__(self) -> None:
        from deepspeed.comm import comm as ds_comm

        self.bytes = 0
        self.calls: list[tuple[str, int]] = []  # the gradient reductions: (op, elements)
        self.all_calls: list[tuple[str, int]] = []  # every reduction, gradients or not
        self._backend = ds_comm.cdb
        self._originals = {n: getattr(self._backend, n) for n in self.NAMES if hasattr(self._backend, n)}
        for name, fn in self._originals.items():
            setattr(self._backend, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name == "reduce_scatter_tensor":  # (output, input): the payload is the input
                payload = args[1] if len(args) > 1 else kwargs["input_tensor"]
            elif name == "reduce_scatter":  # (output, input_list)
                payload = args[1] if len(args) > 1 else kwargs["input_list"]
            else:
                payload = args[0] if args else kwargs.get("tensor", kwargs.get("tensors"))
            tensors = list(payload) if isinstance(payload, (list, tuple)) else [payload]
            numel = sum(t.numel() for t in tensors)
            self.all_calls.append((name, numel))
            if numel >= self.MIN_NUMEL and not any(getattr(t, NOT_A_GRADIENT, False) for t in tensors):
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                self.calls.append((name, numel))
            return fn(*args, **kwargs)
        return counted

    def reset(self) -> None:
        self.bytes = 0
        self.calls = []
        self.all_calls = []

    def close(self) -> None:
        for name in self._originals:
            delattr(self._backend, name)  # drop the instance attribute: the class method shows again

    def __enter__(self) -> "ReductionCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- every collective


def _tensors(x: Any) -> list[Any]:
    return [t for t in (x if isinstance(x, (list, tuple)) else [x]) if hasattr(t, "numel")]


# Which argument is the *message* of each collective: the full-size tensor(s) n of the alpha-beta
# model (an all-reduce of n bytes, a reduce-scatter of an n-byte input, an all-gather into an
# n-byte output), whatever the world size. Values: (position, keyword).
MESSAGE_ARG = {
    "all_reduce": (0, "tensor"), "inference_all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"),
    "reduce": (0, "tensor"), "broadcast": (0, "tensor"),
    "reduce_scatter_tensor": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
    "all_gather_into_tensor": (0, "output_tensor"), "all_gather_base": (0, "output_tensor"),
    "all_gather": (0, "tensor_list"), "all_gather_coalesced": (0, "output_tensors"),
    "all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"),
    "gather": (0, "tensor"), "scatter": (0, "tensor"), "barrier": (None, None),
}
KIND = {"inference_all_reduce": "all_reduce", "all_gather_base": "all_gather_into_tensor"}
"""Names that are the same collective as another (counted under that one)."""
ONE_LAUNCH = {
    "all_reduce_coalesced": "one torch.distributed call over a list of tensors; under NCCL one "
                            "ncclGroupStart/End group, which NCCL launches as one aggregated operation",
    "all_gather_coalesced": "DeepSpeed issues the per-tensor all-gathers inside torch's coalescing manager: "
                            "one NCCL group (one launch) under NCCL",
    "all_gather": "one collective with a list of outputs",
    "reduce_scatter": "one collective with a list of inputs",
}
"""Coalesced or list-form collectives: each is counted as ONE call (one launch), for these reasons."""
_local = threading.local()


@dataclass(frozen=True)
class Collective:
    """One call: the collective's kind, how many tensors, the message's bytes and elements."""

    kind: str
    tensors: int
    bytes: int
    numel: int
    source: str
    """``deepspeed.comm`` (DeepSpeed's backend object) or ``torch.distributed`` (a direct call, e.g.
    ldb_ds's mask broadcast)."""
    not_a_gradient: bool = False


class CollectiveCounter:
    """Counts EVERY collective: DeepSpeed's backend object ``deepspeed.comm.comm.cdb`` (all of
    DeepSpeed's collectives go through it; see :class:`ReductionCounter`) and, for collectives
    called directly on ``torch.distributed`` (ldb_ds's mask broadcast), those functions too.

    A call that DeepSpeed's backend forwards to ``torch.distributed`` is counted once (a
    thread-local flag marks the inside of a backend call). Real traffic, counted, not changed.
    """

    TORCH_NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                   "reduce_scatter", "reduce", "all_reduce_coalesced", "all_to_all_single", "barrier")

    def __init__(self) -> None:
        import torch.distributed as torch_dist
        from deepspeed.comm import comm as ds_comm

        self.calls: list[Collective] = []
        self._patched: list[tuple[Any, str, Any, bool]] = []  # (owner, name, original, was_instance_attr)
        backend = ds_comm.cdb
        for name in MESSAGE_ARG:
            if hasattr(backend, name):
                self._patch(backend, name, "deepspeed.comm", outer=True)
        for name in self.TORCH_NAMES:
            if hasattr(torch_dist, name):
                self._patch(torch_dist, name, "torch.distributed", outer=False)

    def _patch(self, owner: Any, name: str, source: str, outer: bool) -> None:
        original = getattr(owner, name)
        was_instance = name in getattr(owner, "__dict__", {})
        pos, key = MESSAGE_ARG.get(name, (0, "tensor"))
        kind = KIND.get(name, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if getattr(_local, "inside", False):  # forwarded by DeepSpeed's backend: counted there
                return original(*args, **kwargs)
            msg = [] if pos is None else _tensors(args[pos] if len(args) > pos else kwargs.get(key))
            self.calls.append(Collective(kind, len(msg), sum(t.numel() * t.element_size() for t in msg),
                                         sum(t.numel() for t in msg), source,
                                         any(getattr(t, NOT_A_GRADIENT, False) for t in msg)))
            _local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                _local.inside = False

        setattr(owner, name, counted)
        self._patched.append((owner, name, original, was_instance))

    def reset(self) -> None:
        self.calls = []

    def summary(self) -> dict[str, dict[str, int]]:
        """Per kind: calls and message bytes (see :data:`MESSAGE_ARG` for what a message is)."""
        calls, size = Counter(), Counter()
        for c in self.calls:
            calls[c.kind] += 1
            size[c.kind] += c.bytes
        return {k: {"calls": calls[k], "bytes": size[k]} for k in sorted(calls)}

    def close(self) -> None:
        for owner, name, original, was_instance in reversed(self._patched):
            if was_instance:  # a module function (torch.distributed)
                setattr(owner, name, original)
            else:  # a method of DeepSpeed's backend object: drop the instance attribute, the class's shows again
                delattr(owner, name)
        self._patched = []

    def __enter__(self) -> "CollectiveCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["ReductionCounter", "CollectiveCounter", "Collective", "MESSAGE_ARG", "ONE_LAUNCH"]
