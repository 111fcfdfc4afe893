"""Setups ldb_ds refuses at set-up, each with what is unsupported and why: the one home of these refusals.

ldb_ds is exact where its hooks were verified and tested (docs/design.md, section 4): data
parallelism at ZeRO 0-3, every optimizer step going through ldb_ds's step protocol, one param
group per unit. Everything below breaks one of those assumptions, so with LDB enabled it is
an error at set-up instead of a silently wrong run. With LDB disabled nothing is checked
(plain DeepSpeed behind the same API).

The refusals read a :class:`DeepSpeedSettings`: before ``deepspeed.initialize`` it is built
from the config dict, where a value DeepSpeed has not resolved yet (the Hugging Face
Trainer's ``"auto"``) is unknown and refuses nothing; after it, from the engine's resolved
values (``fp16_enabled()``, ``zero_optimization_stage()``, ``optimizer_name()``, ...), which
is what DeepSpeed really uses. :mod:`ldb_ds.setup` runs both (:func:`check_setup`,
:func:`check_engine`), at every entry point.

Every set-up refusal lives here, plus one rule these two call that reads DeepSpeed's
internals and so lives with them: ``zero_hooks.refuse_unverified_step_paths``
(:mod:`ldb_ds.zero_hooks.step_paths`, the step paths ldb_ds verified). Only DeepSpeed's
public API and documented config keys are read in this module; the check of DeepSpeed's
optimizer wrappers after initialize is ``zero_hooks.check_group_order``. Checks made while
training runs (replica hashes, the DROP-batch pre-check) are :mod:`ldb_ds.runtime_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import zero_hooks
from .config import SECTION, LDBConfig, LDBConfigError
from .schedule import sampleable_range
from .units import Unit


class LDBUnsupportedError(ValueError):
    """A setup ldb_ds does not support with ``layer_drop_back`` enabled; the message says why."""


def _fail(what: str, why: str, instead: str) -> None:
    raise LDBUnsupportedError(f"ldb_ds: {what} is not supported with '{SECTION}' enabled: {why}. {instead}")


def _known(value: Any) -> Any:
    """``value``, or None where DeepSpeed has not resolved it yet (Hugging Face's ``"auto"``)."""
    return None if isinstance(value, str) and value == "auto" else value


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The DeepSpeed settings the refusals read; None where not known yet.

    Build it with :meth:`from_config` before ``deepspeed.initialize`` and with
    :meth:`from_engine` after it; a refusal that needs an unknown value waits for the engine.
    """

    fp16: bool | None = False
    bf16: bool | None = False
    zero_stage: int | None = 0
    optimizer_name: str | None = ""
    """DeepSpeed's name for the optimizer it builds from the config (lower case, e.g. 'lamb'),
    or a client optimizer's class name."""
    legacy_fusion: bool | None = False
    mpu: bool = False
    autotp_size: int | None = 0
    sequence_parallel_size: int | None = 1
    mesh_param: bool = False
    managed_gradient_accumulation: bool | None = True
    hybrid_engine: bool | None = False
    deepcompile: bool | None = False

    @classmethod
    def from_config(cls, ds_config: Mapping[str, Any], ds_kwargs: Mapping[str, Any] | None = None
                    ) -> "DeepSpeedSettings":
        """The settings a DeepSpeed config dict (and ``deepspeed.initialize``'s keyword arguments) give.

        Config keys as DeepSpeed 0.19.8 reads them (runtime/config.py, runtime/constants.py).
        """
        def section(key: str) -> Mapping[str, Any]:
            value = ds_config.get(key)
            return value if isinstance(value, Mapping) else {}

        ds_kwargs = ds_kwargs or {}
        optimizer = section("optimizer")
        stage = _known(section("zero_optimization").get("stage", 0))
        autotp = _known(section("tensor_parallel").get("autotp_size", 0))
        seq = _known(ds_config.get("sequence_parallel_size", 1))
        opt_type = _known(optimizer.get("type", ""))
        return cls(
            fp16=_flag(section("fp16").get("enabled", False)),
            bf16=_flag((section("bf16") or section("bfloat16")).get("enabled", False)),
            zero_stage=None if stage is None else int(stage or 0),
            optimizer_name=None if opt_type is None else str(opt_type).lower(),
            legacy_fusion=_flag(optimizer.get("legacy_fusion", False)),
            mpu=ds_kwargs.get("mpu") is not None,
            autotp_size=None if autotp is None else int(autotp or 0),
            sequence_parallel_size=None if seq is None else int(seq or 1),
            mesh_param=ds_kwargs.get("mesh_param") is not None,
            managed_gradient_accumulation=_flag(ds_config.get("managed_gradient_accumulation", True)),
            hybrid_engine=_flag(section("hybrid_engine").get("enabled", False)),
            deepcompile=_flag(section("compile").get("deepcompile", False)))

    @classmethod
    def from_engine(cls, ds_engine: Any) -> "DeepSpeedSettings":
        """What a built DeepSpeed engine really uses: its resolved config, through its public methods."""
        import deepspeed

        autotp = int(ds_engine.autotp_size() or 0)
        raw = ds_engine.config if isinstance(getattr(ds_engine, "config", None), Mapping) else {}
        return cls(
            fp16=bool(ds_engine.fp16_enabled()), bf16=bool(ds_engine.bfloat16_enabled()),
            zero_stage=int(ds_engine.zero_optimization_stage()),
            # DeepSpeed's own test for its legacy fused-Lamb step (engine.py:2606 in 0.19.8).
            optimizer_name=str(ds_engine.optimizer_name() or ""),
            legacy_fusion=bool(ds_engine.optimizer_legacy_fusion()),
            # AutoTP sets engine.mpu itself (engine.py:957); it is refused under its own name.
            mpu=getattr(ds_engine, "mpu", None) is not None and autotp <= 1,
            autotp_size=autotp,
            sequence_parallel_size=int(getattr(ds_engine, "sequence_parallel_size", 1) or 1),
            managed_gradient_accumulation=_flag(raw.get("managed_gradient_accumulation", True)),
            hybrid_engine=isinstance(ds_engine, deepspeed.DeepSpeedHybridEngine),
            deepcompile=bool(ds_engine.is_deepcompile_enabled()))


def _flag(value: Any) -> bool | None:
    value = _known(value)
    return None if value is None else bool(value)


def check_setup(model: nn.Module, ds_config: Mapping[str, Any], cfg: LDBConfig, units: Sequence[Unit],
                ds_kwargs: Mapping[str, Any], optimizer: Any = None) -> None:
    """Raise for the first unsupported part of a setup, before DeepSpeed runs.

    In order: DeepSpeed settings whose step bypasses the step filter (``ValueError``,
    ``zero_hooks.refuse_unverified_step_paths``; ``optimizer`` is the one given to
    ``deepspeed.initialize``), a model with nothing left to drop (:func:`check_sampleable`,
    ``LDBConfigError``), then :func:`check_settings` (:class:`LDBUnsupportedError`).
    """
    if not cfg.enabled:
        return
    zero_hooks.refuse_unverified_step_paths(ds_config, optimizer)
    check_sampleable(units, cfg, type(model).__name__)
    check_settings(model, DeepSpeedSettings.from_config(ds_config, ds_kwargs), cfg, units)


def check_sampleable(units: Sequence[Unit], cfg: LDBConfig, model_name: str = "model") -> None:
    """A model with nothing left to drop after keep_first/keep_last is a config error."""
    if cfg.enabled and len(sampleable_range(len(units), cfg)) == 0:
        raise LDBConfigError(
            f"{model_name} has {len(units)} LDB unit(s) at granularity {cfg.granularity!r}; with "
            f"keep_first = {cfg.keep_first} and keep_last = {cfg.keep_last} none is left to drop. "
            f"Lower keep_first/keep_last (keep_first + keep_last must be at most {max(len(units) - 1, 0)}) "
            f"or use a finer granularity (e.g. 'param').")


def check_engine(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit]) -> None:
    """The same refusals on a built engine: its resolved config and settings and its module as it is now.

    Some setups appear only in or after ``deepspeed.initialize``: an ``mpu``, the resolved
    ``"auto"`` values, and a model Accelerate compiles after it (``engine.compile()``).
    """
    if not cfg.enabled:
        return
    ds_config = ds_engine.config if isinstance(getattr(ds_engine, "config", None), Mapping) else {}
    zero_hooks.refuse_unverified_step_paths(ds_config, zero_hooks.basic_optimizer(ds_engine))
    if getattr(ds_engine, "is_compiled", False):
        refuse_engine_compile()
    check_settings(ds_engine.module, DeepSpeedSettings.from_engine(ds_engine), cfg, units)


def refuse_engine_compile() -> None:
    """Raise for DeepSpeed's ``engine.compile()`` (it compiles the whole model)."""
    raise LDBUnsupportedError(
        "ldb_ds: engine.compile() is not supported with 'layer_drop_back' enabled: it compiles the whole "
        "model, and torch.compile guards on requires_grad, so every new mask recompiles it until "
        "torch._dynamo.config.recompile_limit, after which it runs uncompiled. Compile submodules that each "
        "lie within one LDB unit before ldb_ds.initialize instead (docs/usage.md, 'torch.compile'); under "
        "the Hugging Face Trainer or Accelerate leave torch_compile / the dynamo plugin off.")


def check_settings(model: nn.Module, settings: DeepSpeedSettings, cfg: LDBConfig, units: Sequence[Unit]) -> None:
    """Raise :class:`LDBUnsupportedError` for the first unsupported part of ``model`` and ``settings``."""
    if not cfg.enabled:
        return
    _check_parallelism(model, settings)
    _check_optimizer_paths(settings, cfg)
    check_compiled(model, units, cfg)


def _check_parallelism(model: nn.Module, settings: DeepSpeedSettings) -> None:
    from deepspeed.moe.layer import MoE
    from deepspeed.pipe import PipelineModule

    if isinstance(model, PipelineModule):
        _fail("pipeline parallelism (a PipelineModule, trained by DeepSpeed's PipelineEngine)",
              "PipelineEngine.train_batch() runs forward, backward and the optimizer step itself, "
              "bypassing LDBEngine.forward/step, so no mask would be applied at the window boundaries and "
              "dropped units would be stepped", "Train the model as a plain nn.Module (ZeRO 0-3 data "
              "parallelism), or disable layer_drop_back for pipeline runs.")
    if settings.mpu:
        _fail("tensor/model parallelism (an mpu given to initialize, or found on the engine at attach)",
              "a unit's parameters would be sharded over a model-parallel group, whose reductions and norms "
              "ldb_ds's hooks were not verified on", "Use ZeRO-3 to shard parameters instead.")
    autotp = settings.autotp_size or 0
    if autotp > 1:
        _fail(f"tensor parallelism (tensor_parallel.autotp_size = {autotp})",
              "AutoTP shards units over a tensor-parallel group that ldb_ds's hooks were not verified on",
              "Use ZeRO-3 to shard parameters instead.")
    if settings.mesh_param or (settings.sequence_parallel_size or 1) > 1:
        _fail("sequence parallelism (mesh_param / sequence_parallel_size)",
              "gradients are reduced over a sequence-data-parallel mesh that ldb_ds's hooks were not verified on",
              "Use plain data parallelism with ZeRO 0-3.")
    moe = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    if moe:
        _fail(f"a Mixture-of-Experts model (deepspeed.moe.layer.MoE at {', '.join(moe[:3])})",
              "expert parameters are reduced over expert-parallel groups and split into their own param groups, "
              "which ldb_ds's per-unit groups and hooks were not tested with", "Disable layer_drop_back for "
              "MoE models.")


def _check_optimizer_paths(settings: DeepSpeedSettings, cfg: LDBConfig) -> None:
    # A value still unknown (None: "auto") refuses nothing here; the engine's resolved one decides.
    fp16, bf16 = settings.fp16, settings.bf16
    if fp16 and settings.legacy_fusion:
        _fail("fp16 with optimizer.legacy_fusion = true",
              "FP16_Optimizer's legacy fused-Adam step hands the optimizer one gradient list per param group "
              "by position, so hiding a dropped unit's group would pair gradients with the wrong groups",
              "Remove legacy_fusion (DeepSpeed's default is false).")
    if settings.optimizer_name == "lamb" and (fp16 or bf16) and settings.zero_stage == 0:
        _fail("the Lamb optimizer with fp16/bf16 at ZeRO stage 0",
              "FP16_UnfusedOptimizer's legacy fused-Lamb step hands the optimizer one gradient list per param "
              "group by position, so hiding a dropped unit's group would pair gradients with the wrong groups",
              "Use ZeRO stage 1-3, fp32, or another optimizer.")
    if settings.managed_gradient_accumulation is False and cfg.batch_scaling == "accumulation":
        _fail("managed_gradient_accumulation = false with batch_scaling = 'accumulation'",
              "your loop owns the accumulation boundary, so ldb_ds cannot grow the accumulation in DROP epochs",
              f"Use {SECTION}.batch_scaling = 'micro_batch' (or let DeepSpeed manage the accumulation).")
    if settings.hybrid_engine:
        _fail("DeepSpeed's hybrid engine (hybrid_engine.enabled)",
              "it swaps the module between training and inference containers, which ldb_ds was not tested with",
              "Disable the hybrid engine for LDB training.")
    if settings.deepcompile:
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


def refuse_compiled_model(model: nn.Module) -> None:
    """Refuse a compiled whole model before its units are cut.

    The whole model spans every unit, so :func:`check_compiled` would refuse it too, but only
    after the units exist, and ``torch.compile(model)``'s wrapper hides what cuts them: its
    parameter names start with ``_orig_mod.`` and it has no ``group_matcher`` or
    ``_no_split_modules`` of its own, so at ``granularity: "block"`` the cut fails first, with
    an error about units or patterns that is no help.
    """
    if any(name == "<model>" for name, _ in _compiled_modules(model)):
        _fail("a compiled model (torch.compile(model) or model.compile())",
              "torch.compile guards on requires_grad, so every new mask recompiles the model, up to "
              "torch._dynamo.config.recompile_limit graphs, after which it runs uncompiled",
              "Compile submodules that each lie within one unit instead (e.g. granularity 'block' and "
              "block.compile() for each block: two graphs per block, trainable and dropped), or leave "
              "the model uncompiled.")


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


__all__ = ["LDBUnsupportedError", "DeepSpeedSettings", "check_setup", "check_engine", "check_settings",
           "check_sampleable", "check_compiled", "refuse_compiled_model", "refuse_engine_compile"]
