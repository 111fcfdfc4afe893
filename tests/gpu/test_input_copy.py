"""``process.batch_to_device`` on a GPU: the batch a training step sees is the one the old copy gave.

ldb-train and ``ldb-bench epochs`` copy each batch with ``non_blocking`` and cast it on the device
(so the copy of a pinned batch does not wait for the previous step). The values must be what
``tensor.to(device, dtype)`` (the host-side cast, a blocking copy) gave: fp32 -> bf16 / fp16 rounds
to nearest even on both sides. Checked bitwise here, from pinned and from pageable memory, with
values that need rounding (random normals, and halfway cases of bf16). Skipped without a CUDA GPU;
on the CPU the function is ``tensor.to(dtype)`` itself.
"""

from __future__ import annotations

import pytest
import torch

from ldb_ds.process import batch_to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "same"])
def test_batch_to_device_gives_the_host_cast_values(pinned, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    # bf16 halfway cases (ties to even) and values beyond fp16's range (inf after the cast).
    x.view(-1)[:4] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 70000.0, -1e-9])
    if pinned:
        x = x.pin_memory()
    expected = x.to("cuda", dtype) if dtype is not None else x.to("cuda")
    y = batch_to_device(x, torch.device("cuda"), dtype)
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and y.dtype == (dtype or torch.float32)
    assert torch.equal(y.view(torch.int16 if y.element_size() == 2 else torch.int32),
                       expected.view(torch.int16 if expected.element_size() == 2 else torch.int32))
    labels = torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(batch_to_device(labels.pin_memory() if pinned else labels, "cuda").cpu(), labels)
