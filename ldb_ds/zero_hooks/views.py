"""Parameters as views of DeepSpeed's flat buffers, re-pointed only where they moved.

After every step DeepSpeed points each parameter of a group at its slice of the group's flat
buffer again: ZeRO-1/2 ``_update_model_bit16_weights`` (``stage_1_and_2.py:889``), ZeRO-3
``_unflatten_partitioned_parameters`` (``stage3.py:2792``), both ``p.data = flat.narrow(0, offset,
numel).view(shape)`` per parameter. That costs about 3 us of host time per parameter (the
``Tensor.data`` setter swaps the tensor's storage), with LDB's one group per unit paid on every
kept unit. The step writes the flat buffer in place, so a parameter normally points there already
and setting it again changes nothing. :func:`point_into` sets only a parameter that does not
(moved by a checkpoint load, ``module.to()`` or a user's ``p.data = ...``), so every parameter
ends exactly where DeepSpeed's code leaves it, at a pointer comparison per parameter.
"""

from __future__ import annotations

from typing import Sequence

import torch


def point_into(flat: torch.Tensor, params: Sequence[torch.Tensor], offsets: Sequence[int],
               shapes: Sequence[torch.Size]) -> int:
    """Make ``params[k]`` the view ``flat.narrow(0, offsets[k], numel).view(shapes[k])``; returns how many moved.

    A parameter already is that view when it starts at that address, has that shape and dtype
    and is contiguous (a view of a contiguous slice is): two live tensors at one address share
    memory, and those four fix every element's place. Anything else is set as DeepSpeed sets it.
    """
    base, itemsize, dtype = flat.data_ptr(), flat.element_size(), flat.dtype
    moved = 0
    for p, offset, shape in zip(params, offsets, shapes):
        if (p.data_ptr() != base + offset * itemsize or p.shape != shape or p.dtype != dtype
                or not p.is_contiguous()):
            p.data = flat.narrow(0, offset, shape.numel()).view(shape).data
            moved += 1
    return moved


__all__ = ["point_into"]
