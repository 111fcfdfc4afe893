"""Setups ldb_ds refuses at ``initialize``, each with what is unsupported and why.

ldb_ds is exact where its hooks were verified and tested (docs/design.md, section 4): data
parallelism at ZeRO 0-3, every optimizer step going through ``LDBEngine.step``, one param
group per unit. Everything below breaks one of those assumptions, so with LDB enabled it is
an error at initialize instead of a silently wrong run. With LDB disabled nothing is checked
(plain DeepSpeed behind the same API).

Only DeepSpeed's public API and documented config keys are read here; the check of
DeepSpeed's optimizer wrappers after initialize is ``zero_hooks.check_group_order``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .config import SECTION, LDBConfig
from .schedule import sampleable_range
from .units import Unit


class LDBUnsupportedError(ValueError):
    """A setup ldb_ds does not support with ``layer_drop_back`` enabled; the message says why."""


def _fail(what: str, why: str, instead: str) -> None:
    raise LDBUnsupportedError(f"ldb_ds: {what} is not supported with '{SECTION}' enabled: {why}. {instead}")


def check_setup(model: nn.Module, ds_config: Mapping[str, Any], cfg: LDBConfig, units: Sequence[Unit],
                ds_kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`LDBUnsupportedError` for the first unsupported part of the setup."""
    if not cfg.enabled:
        return
    _check_parallelism(model, ds_config, ds_kwargs)
    _check_optimizer_paths(ds_config, cfg)
    check_compiled(model, units, cfg)


def _check_parallelism(model: nn.Module, ds_config: Mapping[str, Any], ds_kwargs: Mapping[str, Any]) -> None:
    from deepspeed.moe.layer import MoE
    from deepspeed.pipe import PipelineModule

    if isinstance(model, PipelineModule):
        _fail("pipeline parallelism (a PipelineModule, trained by DeepSpeed's PipelineEngine)",
              "PipelineEngine.train_batch() runs forward, backward and the optimizer step itself, "
              "bypassing LDBEngine.forward/step, so no mask would be applied at the window boundaries and "
              "dropped units would be stepped", "Train the model as a plain nn.Module (ZeRO 0-3 data "
              "parallelism), or disable layer_drop_back for pipeline runs.")
    if ds_kwargs.get("mpu") is not None:
        _fail("tensor/model parallelism (an mpu given to initialize)",
              "a unit's parameters would be sharded over a model-parallel group, whose reductions and norms "
              "ldb_ds's hooks were not verified on", "Use ZeRO-3 to shard parameters instead.")
    autotp = (ds_config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0
    if autotp > 1:
        _fail(f"tensor parallelism (tensor_parallel.autotp_size = {autotp})",
              "AutoTP shards units over a tensor-parallel group that ldb_ds's hooks were not verified on",
              "Use ZeRO-3 to shard parameters instead.")
    seq = ds_config.get("sequence_parallel_size", 1) or 1
    if ds_kwargs.get("mesh_param") is not None or seq > 1:
        _fail("sequence parallelism (mesh_param / sequence_parallel_size)",
              "gradients are reduced over a sequence-data-parallel mesh that ldb_ds's hooks were not verified on",
              "Use plain data parallelism with ZeRO 0-3.")
    moe = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    if moe:
        _fail(f"a Mixture-of-Experts model (deepspeed.moe.layer.MoE at {', '.join(moe[:3])})",
              "expert parameters are reduced over expert-parallel groups and split into their own param groups, "
              "which ldb_ds's per-unit groups and hooks were not tested with", "Disable layer_drop_back for "
              "MoE models.")


def _check_optimizer_paths(ds_config: Mapping[str, Any], cfg: LDBConfig) -> None:
    # Config keys as DeepSpeed 0.19.8 reads them (runtime/config.py, runtime/constants.py).
    optimizer = ds_config.get("optimizer") or {}
    opt_type = str(optimizer.get("type", "")).lower()
    fp16 = bool((ds_config.get("fp16") or {}).get("enabled", False))
    bf16 = bool((ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled", False))
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)
    if fp16 and optimizer.get("legacy_fusion", False):
        _fail("fp16 with optimizer.legacy_fusion = true",
              "FP16_Optimizer's legacy fused-Adam step hands the optimizer one gradient list per param group "
              "by position, so hiding a dropped unit's group would pair gradients with the wrong groups",
              "Remove legacy_fusion (DeepSpeed's default is false).")
    if opt_type == "lamb" and (fp16 or bf16) and stage == 0:
        _fail("the Lamb optimizer with fp16/bf16 at ZeRO stage 0",
              "FP16_UnfusedOptimizer's legacy fused-Lamb step hands the optimizer one gradient list per param "
              "group by position, so hiding a dropped unit's group would pair gradients with the wrong groups",
              "Use ZeRO stage 1-3, fp32, or another optimizer.")
    if not ds_config.get("managed_gradient_accumulation", True) and cfg.batch_scaling == "accumulation":
        _fail("managed_gradient_accumulation = false with batch_scaling = 'accumulation'",
              "your loop owns the accumulation boundary, so ldb_ds cannot grow the accumulation in DROP epochs",
              f"Use {SECTION}.batch_scaling = 'micro_batch' (or let DeepSpeed manage the accumulation).")
    if (ds_config.get("hybrid_engine") or {}).get("enabled", False):
        _fail("DeepSpeed's hybrid engine (hybrid_engine.enabled)",
              "it swaps the module between training and inference containers, which ldb_ds was not tested with",
              "Disable the hybrid engine for LDB training.")
    if (ds_config.get("compile") or {}).get("deepcompile", False):
        _fail("DeepCompile (compile.deepcompile = true)",
              "it compiles the whole model, whose graphs guard on requires_grad, and replaces DeepSpeed's "
              "gradient hooks that ldb_ds's exactness relies on", "Disable compile.deepcompile; see docs/usage.md "
              "(torch.compile) for compiling submodules that lie within one unit.")


def _compiled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules compiled by ``torch.compile(module)`` or ``module.compile()``."""
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized_cls = getattr(optimized, "OptimizedModule", ())
    found = []
    for name, m in model.named_modules():
        if (optimized_cls and isinstance(m, optimized_cls)) or getattr(m, "_compiled_call_impl", None) is not None:
            found.append((name or "<model>", m))
    return found


def check_compiled(model: nn.Module, units: Sequence[Unit], cfg: LDBConfig) -> None:
    """Refuse compiled modules that span more than one droppable unit.

    Dynamo guards on every parameter's ``requires_grad``: a compiled module whose parameters
    belong to k droppable units sees up to 2**k masks and recompiles for each new one until
    ``torch._dynamo.config.recompile_limit`` (8), then runs eagerly for good, or with a raised
    limit compiles once per mask (both measured in tests/unit/test_refusals.py). A compiled
    module within one unit sees two states only.
    """
    compiled = _compiled_modules(model)
    if not compiled:
        return
    droppable = set(sampleable_range(len(units), cfg))
    unit_of_param = {id(p): ui for ui, u in enumerate(units) for p in u.params}
    for name, module in compiled:
        spanned = sorted({unit_of_param[id(p)] for p in module.parameters() if id(p) in unit_of_param} & droppable)
        if len(spanned) > 1:
            limit = getattr(torch._dynamo.config, "recompile_limit", None) or \
                getattr(torch._dynamo.config, "cache_size_limit", 8)
            _fail(f"a compiled module ({name!r}) whose parameters belong to {len(spanned)} droppable LDB units",
                  "torch.compile guards on requires_grad, so every new mask recompiles it, up to "
                  f"torch._dynamo.config.recompile_limit ({limit}) graphs, after which it runs uncompiled "
                  "(with a raised limit: one compilation per mask)",
                  "Compile submodules that each lie within one unit instead (e.g. granularity 'block' and "
                  "block.compile() for each block: two graphs per block, trainable and dropped), or leave "
                  "the model uncompiled.")


__all__ = ["LDBUnsupportedError", "check_setup", "check_compiled"]
