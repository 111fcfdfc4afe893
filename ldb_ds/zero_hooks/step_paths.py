"""DeepSpeed settings whose optimizer step would bypass the step filter, refused before ``deepspeed.initialize``.

The config keys are public, but why each one is refused is an internal of DeepSpeed's step
(docs/design.md, section 4), so the rule lives here with the other internals. It is the one
set-up refusal outside :mod:`ldb_ds.refusals`, whose ``check_setup`` and ``check_engine`` call it.
"""

from __future__ import annotations

from typing import Any, Mapping


def _without_auto(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_auto(v) for k, v in value.items() if v != "auto"}
    return value


def refuse_unverified_step_paths(ds_config: Mapping[str, Any], optimizer: Any = None) -> None:
    """Raise ``ValueError`` for DeepSpeed settings whose optimizer step bypasses the step filter.

    Called before ``deepspeed.initialize`` with the DeepSpeed config dict and the
    ``optimizer`` given to ``ldb_ds.initialize``. ZeRO-Offload itself is supported:
    stages 1/2 step every group through ``_optimizer_step(i)`` (``stage_1_and_2.py:3084``,
    the offload branch of ``step``) and stage 3 steps CPU sub-groups through the basic
    optimizer (``stage3.py:1253``); DeepSpeedCPUAdam's ``step`` loops over
    ``self.param_groups`` (``ops/adam/cpu_adam.py:142``), so hidden groups are not
    looked at. Refused, each for its own reason (line numbers: deepspeed 0.19.8):

    * NVMe offload (``offload_optimizer`` or ``offload_param`` ``device: nvme``): the
      swapper moves optimizer state and parameters of every sub-group in and out
      (``stage3.py:2702``, ``:2731``); not verified, and DeepSpeed's async I/O op
      cannot be built on the machines that run the tests;
    * partial offload (``offload_optimizer.ratio`` < 1, ZeRO-3): sub-groups kept on the
      device (``stage3.py:1105``) are stepped by ``backup_optimizer``, a separate
      ``torch.optim.AdamW`` (``:317``, ``:1257``) that the filter does not wrap;
    * SuperOffload (``offload_optimizer.super_offload``, ZeRO-3; ``engine.py:2748``):
      steps and rolls back sub-groups with ``DeepSpeedCPUAdam.step_subgroup`` /
      ``rollback_subgroup`` (``superoffload/superoffload_utils.py:143-145``);
    * ZenFlow (``zero_optimization.zenflow``; ``engine.py:2667``): its selective and
      overlapped CPU steps (``zenflow/zenflow_stage_1_and_2.py:605-626``) update
      parameters outside the per-group step;
    * Muon (``optimizer.type: Muon`` or a Muon optimizer instance): DeepSpeed splits every
      param group into Muon and Adam halves (``engine.py:2425``), so its groups are no
      longer ldb_ds's per-unit groups, and applies Muon updates outside the step
      (``stage_1_and_2.py:3038``);
    * ``zero_optimization.ignore_unused_parameters: false``: a dropped unit is an unused
      parameter by design; ZeRO-Offload's gradient norm asserts on it
      (``stage_1_and_2.py:1934``).
    """
    from deepspeed.runtime.zero.config import get_zero_config

    problems: list[str] = []
    try:
        # DeepSpeed's own parser: it maps deprecated spellings (cpu_offload, cpu_offload_param).
        # "auto" values (Hugging Face's config templates) are left out: none is read here.
        zero = get_zero_config(_without_auto(dict(ds_config)))
    except Exception:  # an invalid section: deepspeed.initialize reports it itself
        zero = None
    if zero is not None:
        oo, op = zero.offload_optimizer, zero.offload_param
        for key, sub in (("offload_optimizer", oo), ("offload_param", op)):
            if sub is not None and str(getattr(sub.device, "value", sub.device)) == "nvme":
                problems.append(f"zero_optimization.{key}.device = 'nvme' (NVMe offload): DeepSpeed's swapper moves "
                                "every sub-group's optimizer state and parameters in and out, a path ldb_ds has not "
                                "verified; use device 'cpu'")
        if oo is not None and int(zero.stage) == 3 and str(getattr(oo.device, "value", oo.device)) != "none":
            if oo.ratio < 1.0:
                problems.append(f"zero_optimization.offload_optimizer.ratio = {oo.ratio} (partial offload): ZeRO-3 "
                                "steps the sub-groups kept on the accelerator with a separate backup optimizer that "
                                "bypasses ldb_ds's step filter, so dropped units there would move; use ratio 1.0")
            if getattr(oo, "super_offload", False):
                problems.append("zero_optimization.offload_optimizer.super_offload = true (SuperOffload): it steps "
                                "sub-groups with DeepSpeedCPUAdam.step_subgroup/rollback_subgroup, bypassing ldb_ds's "
                                "step filter; use plain offload (super_offload false)")
        if getattr(zero, "zenflow", None) is not None:
            problems.append("zero_optimization.zenflow (ZenFlow): its selective and overlapped CPU optimizer steps "
                            "update parameters outside the per-group step that ldb_ds filters; remove the section")
        if not zero.ignore_unused_parameters:
            problems.append("zero_optimization.ignore_unused_parameters = false: a dropped unit is an unused "
                            "parameter in its step by design, and ZeRO-Offload asserts on it; set it to true")
    opt_type = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if opt_type == "muon" or "muon" in type(optimizer).__name__.lower():
        problems.append("the Muon optimizer: DeepSpeed splits every param group into Muon and Adam halves, so its "
                        "groups are no longer ldb_ds's one group per unit, and applies Muon updates outside the "
                        "optimizer step; use another optimizer")
    if problems:
        raise ValueError("ldb_ds (layer_drop_back enabled) does not support: " + "; ".join(problems)
                         + ". Each would move dropped units or bypass ldb_ds's hooks (docs/design.md, section 4); "
                           "disable layer_drop_back to use it with plain DeepSpeed")
