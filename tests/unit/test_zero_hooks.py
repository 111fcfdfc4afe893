"""zero_hooks pieces that need no second rank: the step filter on a real optimizer, the version check."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ldb_ds import zero_hooks
from ldb_ds.controller import StepState


def test_step_filter_hides_groups_scales_lr_and_restores():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters()}], lr=0.5, momentum=0.9,
                          weight_decay=0.1)
    state, patches = StepState(), zero_hooks.PatchSet()
    zero_hooks.install_group_step_filter(opt, state, patches)
    with pytest.raises(RuntimeError, match="already wrapped"):
        zero_hooks.install_group_step_filter(opt, state, patches)
    (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
    b_before = [p.detach().clone() for p in b.parameters()]
    a_before = [p.detach().clone() for p in a.parameters()]
    state.hidden_groups = (opt.param_groups[1],)  # what the controller writes at the step's boundary
    state.lr_factor = 2.0
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(b_before, b.parameters()))  # hidden: not looked at
    assert not any(p in opt.state for p in b.parameters())                   # no momentum buffer either
    # Visible group stepped with lr 0.5 * 2: SGD's first step is p - lr * (g + wd * p).
    for before, p in zip(a_before, a.parameters()):
        assert torch.allclose(p, before - 1.0 * (p.grad + 0.1 * before))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5] and len(opt.param_groups) == 2


def test_step_filter_returns_none_when_everything_visible_is_empty():
    # ZeRO-3 calls the optimizer per sub-group with all other groups' params emptied.
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": []}], lr=0.1)
    state = StepState(hidden_groups=(opt.param_groups[0],))
    zero_hooks.install_group_step_filter(opt, state, zero_hooks.PatchSet())
    p.grad = torch.ones(2)
    assert opt.step() is None
    assert torch.equal(p, torch.ones(2))


def test_patch_set_removes_stacked_wrappers_newest_first():
    """Two patches on one attribute (the non-finite skip wraps the step filter): removal unwinds both."""
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    class_step = type(opt).step
    patches = zero_hooks.PatchSet()
    zero_hooks.install_group_step_filter(opt, StepState(), patches)
    inner = opt.step
    patches.set("outer", zero_hooks.Kind.EXACTNESS, opt, "step", lambda: inner())
    assert len(patches) == 3 and any("step filter (exactness): SGD.step" in d for d in patches.describe())
    patches.remove()
    assert "step" not in vars(opt) and "_ldb_wrapped" not in vars(opt) and type(opt).step is class_step
    patches.remove()  # idempotent


def test_exactness_patch_refuses_a_changed_deepspeed_caller(monkeypatch):
    monkeypatch.setitem(zero_hooks.MIRRORED_SOURCES, "engine.DeepSpeedEngine._take_model_step", "0" * 16)
    with pytest.raises(RuntimeError, match="_take_model_step.*not run"):
        zero_hooks.require_verified("the step filter", ["engine.DeepSpeedEngine._take_model_step"])
    monkeypatch.undo()
    zero_hooks.require_verified("the step filter", ["engine.DeepSpeedEngine._take_model_step"])  # verified: passes


@pytest.mark.parametrize("version,inside", [("0.19.8", True), ("0.19.8+cu130", True), ("0.19.7", False),
                                            ("0.20.0", False), ("0.19.9rc1", False)])
def test_deepspeed_version_range(version, inside):
    assert zero_hooks.deepspeed_version_verified(version) is inside


def test_version_warning_names_version_and_range_once(monkeypatch):
    monkeypatch.setattr(zero_hooks.version, "_version_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert zero_hooks.check_deepspeed_version("0.20.1") is False
        assert zero_hooks.check_deepspeed_version("0.20.1") is False
        assert zero_hooks.check_deepspeed_version("0.19.8") is True
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    low, high = zero_hooks.VERIFIED_DEEPSPEED
    assert "0.20.1" in messages[0] and low in messages[0] and high in messages[0]


def test_older_deepspeed_is_refused_with_the_reason():
    # Measured: 0.19.7 and older fail inside ldb_ds's hooks; 0.19.5 and older corrupt ZeRO-3 checkpoints.
    with pytest.raises(RuntimeError, match=r"needs deepspeed >= 0\.19\.8, found 0\.19\.7"):
        zero_hooks.check_deepspeed_version("0.19.7")


def test_point_into_sets_only_the_parameters_that_moved():
    from ldb_ds.zero_hooks.views import point_into

    flat = torch.arange(20, dtype=torch.float32)
    shapes = [torch.Size([2, 2]), torch.Size([3]), torch.Size([3, 3])]
    offsets = [0, 4, 7]
    params = [flat.narrow(0, o, s.numel()).view(s) for o, s in zip(offsets, shapes)]
    assert point_into(flat, params, offsets, shapes) == 0  # already there: nothing set
    # Moved elsewhere (same values), transposed in place (same address and shape), wrong dtype view.
    params[0].data = params[0].data.clone()
    params[2].data = params[2].data.t()
    params[1].data = flat.narrow(0, 4, 3).view(torch.int32).view(3)
    assert point_into(flat, params, offsets, shapes) == 3
    flat.add_(100)  # an in-place write to the buffer (the all-gather) is what every parameter reads
    for p, o, s in zip(params, offsets, shapes):
        assert p.dtype == flat.dtype and p.shape == s and p.is_contiguous()
        assert torch.equal(p, flat.narrow(0, o, s.numel()).view(s))
    assert point_into(flat, params, offsets, shapes) == 0


@pytest.mark.parametrize("takes_dtype", [True, False], ids=["foreach", "older-torch"])
def test_group_square_sums_are_deepspeeds_per_group_sums(monkeypatch, takes_dtype):
    """One foreach op for every group's gradient norms: the bits of DeepSpeed's per-tensor
    ``vector_norm(g.to(norm dtype))`` on the CPU (ZeRO-1/2 ``:2677``, ZeRO-3's ``.norm(2.0)``); then
    every group's ``stack(norms).pow(2).sum()`` (``:2689``) at once: DeepSpeed's bits for groups of one
    or two tensors, inf and NaN as DeepSpeed has them, an empty group exactly 0; the same where
    torch's ``_foreach_norm`` takes no ``dtype`` (the per-tensor fallback)."""
    from ldb_ds.zero_hooks import norms

    if not takes_dtype:
        monkeypatch.setattr(norms, "foreach_norm_takes_dtype", lambda device_type, norm_dtype: False)
    assert norms.foreach_norm_takes_dtype("cpu", torch.float64) is takes_dtype
    g = torch.Generator().manual_seed(0)
    for grad_dtype in (torch.float32, torch.bfloat16):
        grads = [[torch.randn(n, generator=g).to(grad_dtype) for n in sizes]
                 for sizes in ((64, 8), (), (1000, 3, 5), (100_000,), (), (7,))]
        grads[2][1][0] = float("inf")
        grads[3][0][7] = float("nan")
        for norm_dtype in (torch.float64, torch.float32):
            flat = [t for ts in grads for t in ts]
            got = norms.tensor_norms(flat, norm_dtype)
            want = [torch.linalg.vector_norm(t.to(norm_dtype), ord=2) for t in flat]
            assert len(got) == len(want) == 7
            for a, b in zip(got, want):
                assert a.dtype == norm_dtype and (torch.equal(a, b) or (a.isnan() and b.isnan())), (a, b)
            sums = norms.group_square_sums(grads, torch.zeros((), dtype=norm_dtype))
            assert sums.dtype == norm_dtype and sums.shape == (6,)
            deepspeeds = [torch.stack([torch.linalg.vector_norm(t.to(norm_dtype), ord=2) for t in ts]).pow(2).sum()
                          for ts in grads if ts]
            for i, want_sum in zip((0, 3, 5), (deepspeeds[0], deepspeeds[2], deepspeeds[3])):
                assert torch.equal(sums[i], want_sum) or (sums[i].isnan() and want_sum.isnan()), (i, sums[i])
            assert sums[1] == 0 and sums[4] == 0 and sums[2].isinf() and sums[3].isnan()
    assert norms.tensor_norms([], torch.float64) == []
    assert torch.equal(norms.group_square_sums([[], []], torch.zeros((), dtype=torch.float64)),
                       torch.zeros(2, dtype=torch.float64))


def test_every_mirrored_source_hashes_as_verified_on_the_installed_deepspeed():
    """A mistyped or stale digest would silently keep DeepSpeed's own loops (a fallback, not an error)."""
    from ldb_ds.zero_hooks import version, zero0_step, zero3_step, zero12_step

    if not version.deepspeed_version_verified(version.installed_version()):
        pytest.skip(f"DeepSpeed {version.installed_version()} is not the verified release")
    stale = {n: version.source_digest(version.mirrored_object(n)) for n, d in version.MIRRORED_SOURCES.items()
             if version.source_digest(version.mirrored_object(n)) != d}
    assert not stale, f"update MIRRORED_SOURCES after re-checking these mirrors: {stale}"
    listed = (zero0_step.MIRRORED + zero0_step.LOSS_SCALING_MIRRORED + zero12_step.MIRRORED + zero12_step.NORM_MIRRORED
              + [n for names in zero3_step.MIRRORED.values() for n in names])
    assert set(listed) <= set(version.MIRRORED_SOURCES)
    # The synchronization the ZeRO 1-3 replacements rely on on a GPU is checked with each of them.
    assert zero12_step.EPILOGUE in zero12_step.MIRRORED and zero12_step.EPILOGUE in zero12_step.NORM_MIRRORED
    assert all(zero3_step.EPILOGUE in names for names in zero3_step.MIRRORED.values())
