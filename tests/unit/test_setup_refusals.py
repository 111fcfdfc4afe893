"""The same setup refusals at every entry point (ldb_ds/setup.py), one process.

Before ``deepspeed.initialize``: ``ldb_ds.initialize`` and the Accelerate recipe's
``plan_param_groups`` (which ``LDBTrainer.create_optimizer`` calls too) refuse every setup of
tests/unit/test_refusals.py with the same message. After it: ``ldb_ds.attach`` (and so
``plan.attach`` and the Trainer's attach) refuses what only the built engine shows, read from
its resolved settings: a model compiled by ``engine.compile()`` (as Accelerate does after
``deepspeed.initialize``) and ``"auto"`` values. The Trainer itself runs in
tests/dist/test_hf_refusals.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import deepspeed
import ldb_ds
from ldb_ds.attach import attach
from ldb_ds.config import LDBConfigError
from ldb_ds.refusals import DeepSpeedSettings, LDBUnsupportedError, check_settings
from ldb_ds.integrations.hf.plan import plan_param_groups
from ldb_ds.setup import prepare
from tests.unit.test_refusals import CASES, _config, _model

# Seen only by deepspeed.initialize's keyword arguments: the recipe and the Trainer never pass one.
NEEDS_DS_KWARGS = {"mpu"}
HF_SECTION = {"layer_drop_back": {"batch_kappa": 1}}  # the Hugging Face entries refuse batch_kappa != 1


def _refuse_with(entry: str, model: nn.Module, config: dict, kwargs: dict) -> None:
    if entry == "initialize":
        ldb_ds.initialize(model=model, config=config, **kwargs)
    elif entry == "plan_param_groups":
        plan_param_groups(model, config)
    else:
        prepare(model, config, ds_kwargs=kwargs)


ENTRIES_BEFORE_DEEPSPEED = ("initialize", "plan_param_groups", "prepare")


@pytest.mark.parametrize("entry", ENTRIES_BEFORE_DEEPSPEED)
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_entry_refuses_before_deepspeed(single_rank_env, entry, name):
    kwargs, top, phrase = CASES[name]
    if entry == "plan_param_groups" and name in NEEDS_DS_KWARGS:
        pytest.skip("the recipe passes deepspeed.initialize no mpu; an engine's mpu is refused at attach")
    kwargs = dict(kwargs)
    model = kwargs.pop("model", _model)()
    config = _config(**top)
    config["layer_drop_back"] = {**config["layer_drop_back"], **HF_SECTION["layer_drop_back"]}
    with pytest.raises(LDBUnsupportedError) as err:
        _refuse_with(entry, model, config, kwargs)
    assert phrase in str(err.value) and "is not supported with 'layer_drop_back' enabled" in str(err.value)


def test_batch_kappa_is_refused_only_under_the_hugging_face_entries():
    config = _config(layer_drop_back={"batch_kappa": 2})
    with pytest.raises(LDBConfigError, match='"batch_kappa": 1'):
        plan_param_groups(_model(), config)
    # The core's set-up (initialize's) scales the DROP batch itself: batch_kappa 2 is the method.
    assert prepare(_model(), config).cfg.batch_kappa == 2


def test_auto_values_are_unknown_before_deepspeed_and_refuse_nothing():
    # "auto" (the Trainer's config templates) is resolved by the Trainer or Accelerate later;
    # the engine's resolved value decides at attach (next tests).
    config = _config(bf16={"enabled": "auto"}, zero_optimization={"stage": "auto"},
                     optimizer={"type": "Lamb", "params": {"lr": "auto"}})
    settings = DeepSpeedSettings.from_config(config)
    assert settings.bf16 is None and settings.zero_stage is None and settings.optimizer_name == "lamb"
    prepare(_model(), config)  # no error, and no int("auto") crash
    resolved = dataclasses.replace(settings, bf16=True, zero_stage=0)
    with pytest.raises(LDBUnsupportedError, match="Lamb optimizer with fp16/bf16 at ZeRO stage 0"):
        check_settings(_model(), resolved, prepare(_model(), config).cfg, [])


def _engine(model: nn.Module, config: dict):
    """A real 1-rank DeepSpeed engine over the set-up's groups, built as Accelerate builds it."""
    setup = prepare(model, config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=setup.groups, config=config)
    return engine, setup


def test_engine_settings_are_deepspeeds_resolved_values(single_rank_env):
    engine, _ = _engine(_model(), _config(bf16={"enabled": True}))
    try:
        settings = DeepSpeedSettings.from_engine(engine)
        assert (settings.bf16, settings.fp16, settings.zero_stage) == (True, False, 0)
        # DeepSpeed's own name: a torch optimizer keeps its case; its own ones are lower case ("lamb").
        assert settings.optimizer_name == "SGD" and not settings.mpu and not settings.deepcompile
    finally:
        engine.destroy()


def test_attach_refuses_a_model_compiled_after_deepspeed_initialize(single_rank_env):
    engine, setup = _engine(_model(), _config())
    try:
        engine.compile(backend="eager")  # what Accelerate does with a dynamo plugin (torch_compile=True)
        with pytest.raises(LDBUnsupportedError, match=r"engine\.compile\(\) is not supported"):
            attach(engine, setup.cfg, setup.units, setup.unit_of_group, setup.params_of_group)
        assert getattr(engine, "_ldb_attachment", None) is None  # nothing was installed
    finally:
        engine.destroy()


def test_attach_refuses_a_compiled_module_spanning_units(single_rank_env):
    model = _model()
    engine, setup = _engine(model, _config())
    try:
        model.compile(backend="eager")  # the whole model, after deepspeed.initialize
        with pytest.raises(LDBUnsupportedError, match="droppable LDB units"):
            attach(engine, setup.cfg, setup.units, setup.unit_of_group, setup.params_of_group)
    finally:
        engine.destroy()


def test_engine_compile_after_attach_is_refused_until_detach(single_rank_env):
    engine, setup = _engine(_model(), _config())
    try:
        att = attach(engine, setup.cfg, setup.units, setup.unit_of_group, setup.params_of_group)
        with pytest.raises(LDBUnsupportedError, match=r"engine\.compile\(\)"):
            engine.compile(backend="eager")
        assert not engine.is_compiled
        att.detach()
        assert "compile" not in vars(engine)  # DeepSpeed's own method again
    finally:
        engine.destroy()


def test_attach_with_ldb_off_refuses_nothing(single_rank_env):
    config = _config(layer_drop_back={"enabled": False})
    engine, setup = _engine(_model(), config)
    try:
        engine.compile(backend="eager")
        attach(engine, setup.cfg, setup.units, setup.unit_of_group).detach()
    finally:
        engine.destroy()

