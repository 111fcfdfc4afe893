"""Per-group gradient-norm sums for all param groups with a constant number of tensor ops.

DeepSpeed computes a norm per param group with one small chain of ops per group
(``torch.stack(norms).pow(2).sum()``, ``stage_1_and_2.py:2689`` and ``stage3.py:2467``). With
one param group per unit that is 3-4 kernel launches per unit per step, which a GPU exposes as
host time. :func:`group_square_sums` does the same arithmetic for every group at once: the
per-tensor norms of all groups go into one ``[groups, width]`` matrix, each row padded with
exact zeros, and one ``pow(2)`` and one row ``sum`` give every group's sum of squares.

Exactness: ``pow`` is elementwise, so every squared norm is DeepSpeed's value. A row sum adds
the same values plus trailing zeros; adding ``+0.0`` is exact, so a group of one or two tensors
(most units at ``module`` granularity: a weight, or a weight and a bias) gets DeepSpeed's bits.
A group of three or more tensors may be summed in another order by the row reduction than by
DeepSpeed's 1-D sum: at most a last-bit difference in the norm dtype's sum (float64 by
default), before DeepSpeed casts it to float32 (ZeRO-1/2) or takes its square root. The
resulting clip coefficient differs from DeepSpeed's by at most one float32 rounding of a group
norm, a relative 1e-7, inside the 1e-6 bound docs/design.md (section 4) states; without
clipping the norm only decides overflow (inf/NaN propagate the same way) and is reported.

The per-tensor norms themselves (:func:`tensor_norms`): DeepSpeed takes each gradient's norm with
its own cast and reduction (``vector_norm(g.to(norm dtype))``), two or three kernel launches per
tensor. ``torch._foreach_norm(tensors, 2, dtype=...)`` takes all of them in one op: on CUDA a
multi-tensor kernel, elsewhere torch's per-tensor loop in C++ (the same ``vector_norm`` with the
dtype: DeepSpeed's bits, checked by tests/unit/test_zero_hooks.py). The CUDA kernel may add a
tensor's squares in another order than ``vector_norm``'s reduction: a difference in the last bits
of the norm dtype (float64 by default), of the kind of the row sum's above, so the same bound.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


@functools.cache
def foreach_norm_takes_dtype(device_type: str, norm_dtype: torch.dtype) -> bool:
    """Whether ``torch._foreach_norm`` takes ``dtype=norm_dtype`` on ``device_type`` for every
    floating gradient dtype. Asked once per device type and norm dtype, at set-up, with tiny tensors:
    older torch has no ``dtype`` argument, and an accelerator's foreach kernels may lack a dtype."""
    try:
        for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
            torch._foreach_norm([torch.zeros(1, dtype=grad_dtype, device=device_type)], 2, dtype=norm_dtype)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def tensor_norms(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """``[vector_norm(t.to(dtype), 2) for t in tensors]`` in one foreach op.

    Where ``_foreach_norm`` takes no ``dtype`` (:func:`foreach_norm_takes_dtype`, older torch) each
    norm is taken as DeepSpeed takes it.
    """
    if not tensors:
        return []
    with torch.no_grad():
        if foreach_norm_takes_dtype(tensors[0].device.type, dtype):
            return torch._foreach_norm(tensors, 2, dtype=dtype)
        return [torch.linalg.vector_norm(t.to(dtype), 2) for t in tensors]


def group_square_sums(grads_by_group: Sequence[Sequence[torch.Tensor]], zero: torch.Tensor) -> torch.Tensor:
    """``[sum(vector_norm(g.to(zero.dtype), 2) ** 2 for g in grads_by_group[i]) for i]`` as one tensor,
    in a constant number of ops whatever the number of groups and tensors.

    Every gradient of every group goes into one :func:`tensor_norms`; the norms are laid out in one
    pass as a ``[groups, width]`` matrix, each row padded with ``zero``; one ``pow(2)`` and one row
    ``sum`` give every group's sum of squares. ``zero`` is a 0-d zero tensor of the norm dtype on the
    gradients' device (allocated once by the caller): it pads short rows and stands for groups with
    no gradients (dropped units, empty partitions), which then sum to exactly 0, the value
    DeepSpeed's zero fill gives them.
    """
    sizes = [len(grads) for grads in grads_by_group]
    norms = tensor_norms([g for grads in grads_by_group for g in grads], zero.dtype)
    width = max(sizes, default=0) or 1
    padded: list[torch.Tensor] = []
    start = 0
    for n in sizes:
        padded.extend(norms[start:start + n])
        padded.extend([zero] * (width - n))
        start += n
    return torch.stack(padded).view(len(sizes), width).pow(2).sum(dim=1)


__all__ = ["group_square_sums", "tensor_norms", "foreach_norm_takes_dtype"]
