"""Exact count of the bytes DeepSpeed hands to gradient reductions.

Used by the benchmark and the tests to *count* (not estimate) communication:
``with ReductionCounter() as counter: ...; counter.bytes``.
"""

from __future__ import annotations

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


__all__ = ["ReductionCounter"]
