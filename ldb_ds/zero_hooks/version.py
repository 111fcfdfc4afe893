"""Which DeepSpeed is installed, and whether it is the one ldb_ds's hooks were checked against.

Two checks (docs/design.md, section 4):

* the release range :data:`VERIFIED_DEEPSPEED`, checked at ``initialize``: older releases are
  refused, newer ones warned about (:func:`check_deepspeed_version`);
* for ldb_ds's own versions of DeepSpeed's step loops (:mod:`.zero0_step`, :mod:`.zero12_step`, :mod:`.zero3_step`),
  the *source* of every DeepSpeed function a replacement mirrors must hash to what was verified
  (:data:`MIRRORED_SOURCES`, :func:`mirrors_verified`); otherwise DeepSpeed's own code runs.
  A version number alone would not catch a patched or vendored DeepSpeed.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from typing import Any, Sequence

# The DeepSpeed releases every hook in this package was checked against (file:line citations are
# from the last one), inclusive. Older releases are refused at initialize: they lack internals
# used here (``runtime.utils.combine_grad_norm_groups`` is new in 0.19.8) and before 0.19.6 ZeRO-3
# corrupts a checkpoint saved with parameters toggled around the save. Newer releases get a
# warning; the group-order check still runs and raises if DeepSpeed no longer keeps our groups.
VERIFIED_DEEPSPEED = ("0.19.8", "0.19.8")

# sha256 (first 16 hex digits) of ``inspect.getsource`` of each DeepSpeed function a step-loop
# replacement mirrors, as in deepspeed 0.19.8 (keys: module under deepspeed.runtime.zero - but
# ``utils``, ``engine`` and ``fp16.*`` under deepspeed.runtime, ``moe.*`` under deepspeed - and
# qualified name). A changed function means the mirror may be stale: the replacement is then
# not installed and DeepSpeed's own code runs.
MIRRORED_SOURCES = {
    "stage_1_and_2.DeepSpeedZeroOptimizer.step": "9520884fd916d178",
    "stage_1_and_2.DeepSpeedZeroOptimizer._update_model_bit16_weights": "f6e3c0c53b4a7e06",
    "stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step": "d7e21affbbf9b696",
    "utils.all_gather_into_tensor_dp_groups": "6e61807fbe6b0417",
    "stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups": "6a068faa3149b1f4",
    "stage3.DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct": "5ba2252d5f16b541",
    "stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step": "35f8511bba5ff760",
    "stage3.DeepSpeedZeroOptimizer_Stage3.step": "c751b3209f83d3b9",
    "stage3.DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group": "6c19570c775487ef",
    "stage3.DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads": "3f0d9e8e7861fd44",
    "stage3.DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters": "af7b449bee8786ec",
    "stage3.DeepSpeedZeroOptimizer_Stage3._release_sub_group": "8830be5fe99207f7",
    "stage3.DeepSpeedZeroOptimizer_Stage3._unflatten_partitioned_parameters": "00cc8a3f65af736f",
    "stage_1_and_2.DeepSpeedZeroOptimizer.scaled_global_norm": "63c6a6fe100c4e49",
    "stage_1_and_2.DeepSpeedZeroOptimizer.get_grad_norm_direct": "72af0993ad8cde2c",
    "utils.combine_grad_norm_groups": "37a114f1037dc520",
    # The callers of the basic optimizer's step that the step filter relies on (step_filter.FILTER_CALLERS),
    # and the function the all-gather skip wraps.
    "engine.DeepSpeedEngine._take_model_step": "c4c6e01aa1fc4e7d",
    "fp16.fused_optimizer.FP16_Optimizer.step": "b6f68ab9785efd33",
    "bf16_optimizer.BF16_Optimizer.step": "9b21d4a28f8714d9",
    "utils.all_gather_dp_groups": "87c5e3c4215b8194",
    # zero0_step: FP16_UnfusedOptimizer's step and what it calls (the overflow check's functions
    # too: zero0_step relies on an inf/NaN gradient giving an invalid norm instead of calling it).
    "fp16.unfused_optimizer.FP16_UnfusedOptimizer.step": "626bd9aa8af843e9",
    "fp16.unfused_optimizer.FP16_UnfusedOptimizer.unscale_and_clip_grads": "748792c7d1075f9d",
    "fp16.unfused_optimizer.FP16_UnfusedOptimizer._skip_invalid_grad_norm": "4d93702baa0d43b5",
    "moe.utils.split_params_grads_into_shared_and_expert_params": "f22f59a57c3713a3",
    "utils.get_weight_norm": "c62f70351cebc9ad",
    "utils.get_global_norm": "2279a25f9445daa5",
    "utils.CheckOverflow.check": "357a6df530f97581",
    "utils.CheckOverflow.has_overflow": "729b3cbc000e69e4",
    "utils.CheckOverflow.has_overflow_serial": "6d059f8950716121",
    "utils.has_inf_or_nan": "f2891c8e640be50c",
    # zero0_step.install_fp16_loss_scaling: the engine's backward that leaves the loss unscaled at
    # ZeRO-0, and the fp16 wrappers' own backward whose scaling it applies instead.
    "engine.DeepSpeedEngine.backward": "b8c4368bee04391d",
    # accumulation.set_accumulation_steps: the run-long micro-step boundary rule, and the batch-size
    # setter that changes only the accumulation count.
    "engine.DeepSpeedEngine.is_gradient_accumulation_boundary": "3b2d8869fe1c9ca3",
    "engine.DeepSpeedEngine.set_train_batch_size": "b1519283d7f588c5",
    "fp16.unfused_optimizer.FP16_UnfusedOptimizer.backward": "0fa9d435f47f7f58",
    "fp16.fused_optimizer.FP16_Optimizer.backward": "6dce1e793bdca85b",
    # The backward epilogues: on a GPU the ZeRO-1/2 and ZeRO-3 replacements read the reduced
    # gradients on the current stream, which is safe because these wait for the reduction streams
    # (stage_1_and_2.py:1026-1028 with overlap_comm, stage3.py:1413-1414) before any step runs.
    "stage_1_and_2.DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue": "26ceef6d75b34b97",
    "stage3.DeepSpeedZeroOptimizer_Stage3.independent_gradient_partition_epilogue": "f1575b87b3d6c083",
}

_version_warned = False


def installed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def deepspeed_version_verified(version: str) -> bool:
    """Whether ``version`` lies in :data:`VERIFIED_DEEPSPEED` (inclusive)."""
    # Compare releases only: 0.19.8+cu130 and 0.19.8.post1 are 0.19.8 (packaging comes with DeepSpeed).
    from packaging.version import Version

    low, high = (Version(v).release for v in VERIFIED_DEEPSPEED)
    return low <= Version(version).release[:3] <= high


def check_deepspeed_version(version: str | None = None) -> bool:
    """Refuse a DeepSpeed older than the verified range, warn once for a newer one.

    Returns whether ``version`` (default: the installed one) is inside the range.
    """
    global _version_warned
    if version is None:
        version = installed_version()
    from packaging.version import Version

    if Version(version).release[:3] < Version(VERIFIED_DEEPSPEED[0]).release:
        raise RuntimeError(f"ldb_ds needs deepspeed >= {VERIFIED_DEEPSPEED[0]}, found {version}: older releases "
                           "lack DeepSpeed internals ldb_ds uses, and before 0.19.6 ZeRO-3 checkpoints of toggled "
                           f"parameters are corrupted. pip install 'deepspeed>={VERIFIED_DEEPSPEED[0]},<0.20'")
    ok = deepspeed_version_verified(version)
    if not ok and not _version_warned:
        _version_warned = True
        warnings.warn(f"ldb_ds: deepspeed {version} is outside the range ldb_ds's DeepSpeed hooks were verified "
                      f"on ({VERIFIED_DEEPSPEED[0]} to {VERIFIED_DEEPSPEED[1]}); ldb_ds checks at initialize that "
                      "DeepSpeed keeps its param groups and raises if not, but run the tests "
                      "(tests/dist) before trusting results", RuntimeWarning, stacklevel=3)
    return ok


def mirrored_object(name: str) -> Any:
    """The DeepSpeed function a :data:`MIRRORED_SOURCES` key names."""
    module_name, *attrs = name.split(".")
    if module_name in ("fp16", "moe"):  # deepspeed.runtime.fp16.<module>, deepspeed.moe.<module>
        module_name, attrs = f"{module_name}.{attrs[0]}", attrs[1:]
    package = "deepspeed" if module_name.startswith("moe.") else "deepspeed.runtime" \
        if module_name in ("utils", "engine", "bf16_optimizer") or module_name.startswith("fp16.") \
        else "deepspeed.runtime.zero"
    obj: Any = importlib.import_module(f"{package}.{module_name}")
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def _unwrapped(fn: Any) -> Any:
    # DeepSpeed decorates some methods with instrument_w_nvtx (utils/nvtx.py:25), whose wrapper
    # keeps the function in its closure, not in __wrapped__.
    for _ in range(4):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and getattr(fn, "__closure__", None):
            inner = next((c.cell_contents for c in fn.__closure__ if inspect.isfunction(c.cell_contents)), None)
        if inner is None:
            break
        fn = inner
    return fn


def source_digest(obj: Any) -> str | None:
    """Short sha256 of a function's source (decorators looked through), None where it cannot be read."""
    try:
        return hashlib.sha256(inspect.getsource(_unwrapped(obj)).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def sources_match(names: Sequence[str]) -> bool:
    """Whether the installed DeepSpeed's functions ``names`` hash to the verified source (any version)."""
    return all(source_digest(mirrored_object(n)) == MIRRORED_SOURCES[n] for n in names)


def mirrors_verified(names: Sequence[str]) -> bool:
    """Whether the installed DeepSpeed is verified and its functions ``names`` are as verified."""
    if not deepspeed_version_verified(installed_version()):
        return False
    return sources_match(names)
