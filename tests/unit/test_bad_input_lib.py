"""Bad input to the library: each mistake is refused with its type and a message naming what is wrong.

Two kinds of cases:

* refused before DeepSpeed builds anything (``ldb_ds.initialize`` arguments, the
  ``layer_drop_back`` section, the config file): run here, in the test process, with the
  working directory in a temporary folder whose files are hashed before and after (nothing
  outside is written or removed);
* misuse of a built engine (``step()`` before ``backward()``, ``set_epoch`` with a wrong type,
  a full load of a plain DeepSpeed checkpoint, a null or disabled section, tied weights): run on
  one real rank (gloo, DeepSpeed on the CPU), all cases in one process (start-up dominates).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ldb_ds
from ldb_ds import config as ldb_config
from ldb_ds.config import LDBConfigError
from tests.support.bad_input_workers import ON, ds_config, make_model, run_engine_cases, tree_hashes
from tests.support.dist import run_distributed


def _with_section(**section) -> dict:
    return ds_config(0, {**ON, **section})


def _initialize(**kwargs):
    kwargs.setdefault("model", make_model())
    kwargs.setdefault("config", ds_config())
    return lambda: ldb_ds.initialize(**kwargs)


def _bound_scheduler():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ds_config()
    del config["optimizer"]
    return ldb_ds.initialize(model=model, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.StepLR(opt, 1),
                             config=config)


def _config_file(text: str):
    def case():
        return ldb_ds.initialize(model=make_model(), config="ds.json")
    case.files = {"ds.json": text}  # written into the test's temporary working directory first
    return case


# name -> (the call, exception type, phrases the message must contain)
BEFORE_DEEPSPEED = {
    # The section: numbers are finite, types are not converted.
    "kappa_infinite_json": (_config_file('{"train_micro_batch_size_per_gpu": 2, "layer_drop_back": '
                                         '{"enabled": true, "kappa": 1e999}}'),
                            LDBConfigError, ["layer_drop_back.kappa = inf", "finite"]),
    "drop_rate_nan": (_initialize(config=_with_section(drop_rate=float("nan"))), LDBConfigError,
                      ["layer_drop_back.drop_rate = nan", "finite"]),
    "drop_rate_string": (_initialize(config=_with_section(drop_rate="0.5")), LDBConfigError,
                         ["layer_drop_back.drop_rate = '0.5'", "int or float"]),
    "sampling_rate_float": (_initialize(config=_with_section(sampling_rate=1.5)), LDBConfigError,
                            ["layer_drop_back.sampling_rate = 1.5", "int"]),
    "batch_kappa_whole_float": (_initialize(config=_with_section(batch_kappa=2.0)), LDBConfigError,
                                ["layer_drop_back.batch_kappa = 2.0", "int"]),
    "keep_last_bool": (_initialize(config=_with_section(keep_last=True)), LDBConfigError,
                       ["layer_drop_back.keep_last = True", "int"]),
    "enabled_string": (_initialize(config=_with_section(enabled="true")), LDBConfigError,
                       ["layer_drop_back.enabled = 'true'", "bool"]),
    "kappa_nan_in_disabled_section": (_initialize(config=ds_config(0, {"enabled": False, "kappa": float("nan")})),
                                      LDBConfigError, ["layer_drop_back.kappa = nan"]),
    "every_unit_droppable": (_initialize(config=_with_section(keep_first=0, keep_last=0)), LDBConfigError,
                             ["keep_first = 0 and keep_last = 0", "Set keep_last >= 1"]),
    "nothing_left_to_drop": (_initialize(config=_with_section(keep_first=2, keep_last=1)), LDBConfigError,
                             ["3 LDB unit(s)", "none is left to drop", "keep_first + keep_last must be at most 2"]),
    "section_is_a_list": (_initialize(config=ds_config(0, [1, 2])), LDBConfigError,
                          ["'layer_drop_back' must be a JSON object"]),
    "typo_in_section": (_initialize(config=_with_section(drop_rte=0.3)), LDBConfigError,
                        ["'drop_rte'", "allowed keys"]),
    # The config itself.
    "config_file_holds_a_list": (_config_file("[1, 2]"), LDBConfigError, ["ds.json must hold a JSON object"]),
    "config_file_missing": (_initialize(config="missing.json"), FileNotFoundError, ["missing.json"]),
    "config_is_a_number": (_initialize(config=3), TypeError, ["DeepSpeed config", "got int"]),
    # ldb_ds.initialize's own arguments.
    "model_is_a_string": (_initialize(model="resnet18"), TypeError, ["model must be a torch.nn.Module", "str"]),
    "model_missing": (_initialize(model=None), ValueError, ["needs a model"]),
    "optimizer_is_a_string": (_initialize(optimizer="adam"), TypeError, ["optimizer must be", "'adam'"]),
    "model_parameters_is_a_tensor": (_initialize(model_parameters=torch.zeros(2)), TypeError,
                                     ["model_parameters must be an iterable", "Tensor"]),
    "model_parameters_is_one_group_dict": (_initialize(model_parameters={"params": []}), TypeError,
                                           ["model_parameters must be an iterable", "dict"]),
    "num_workers_float": (_initialize(num_workers=1.5), TypeError, ["num_workers must be an integer >= 0", "1.5"]),
    "num_workers_bool": (_initialize(num_workers=True), TypeError, ["num_workers must be an integer >= 0"]),
    "num_workers_negative": (_initialize(num_workers=-1), ValueError, ["num_workers must be an integer >= 0", "-1"]),
    "collate_fn_not_callable": (_initialize(collate_fn="stack"), TypeError, ["collate_fn must be callable"]),
    "persistent_workers_string": (_initialize(persistent_workers="yes"), TypeError,
                                  ["persistent_workers must be a bool", "'yes'"]),
    "block_granularity_without_source": (_initialize(config=_with_section(granularity="block")), LDBConfigError,
                                         ["granularity = 'block' needs block_pattern", "Sequential"]),
    # A scheduler made on the optimizer ldb_ds rebuilds would drive the old one: no LR would apply.
    "lr_scheduler_bound_to_the_users_optimizer": (_bound_scheduler, ValueError,
                                                  ["lr_scheduler is a StepLR object bound to the SGD you made",
                                                   "never be applied", "lr_scheduler=lambda opt:"]),
}


@pytest.fixture
def run_dir(single_rank_env, monkeypatch, tmp_path):
    # One rank (conftest.single_rank_env), in a folder of its own with a file that must survive.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "beside.txt").write_text("a file beside the run that must survive")
    return tmp_path


@pytest.mark.parametrize("name", sorted(BEFORE_DEEPSPEED))
def test_refused_before_deepspeed_naming_what_is_wrong(run_dir, name):
    call, error, phrases = BEFORE_DEEPSPEED[name]
    for file_name, text in getattr(call, "files", {}).items():
        (run_dir / file_name).write_text(text)
    before = tree_hashes(str(run_dir))
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "\n" not in message, "one line"
    # The call wrote, changed or removed nothing in the working directory.
    assert tree_hashes(str(run_dir)) == before
    assert (run_dir / "beside.txt").read_text().startswith("a file beside")


def test_null_section_warns_once_and_is_off(monkeypatch):
    monkeypatch.setattr(ldb_config, "_null_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert ldb_config.LDBConfig.from_ds_config({"layer_drop_back": None}).enabled is False
        assert ldb_config.LDBConfig.from_ds_config({}).enabled is False  # absent: no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert '"layer_drop_back": null' in messages[0] and "OFF" in messages[0]
    assert '{"enabled": false}' in messages[0] and '{"enabled": true}' in messages[0]


# name -> (exception type name, or "ok"; phrases in the message or the result; phrases in a warning)
ENGINE_MISUSE = {
    "step_before_backward_ldb_on_zero2": ("RuntimeError", ["engine.step()", "call engine.backward(loss) first"], []),
    "step_before_backward_ldb_off_zero0": ("RuntimeError", ["call engine.backward(loss) first"], []),
    "second_step_without_backward": ("RuntimeError", ["no engine.backward(loss) since the last step()"], []),
    "set_epoch_float": ("TypeError", ["engine.set_epoch(epoch)", "integer >= 0", "float 1.5"], []),
    "set_epoch_bool": ("TypeError", ["engine.set_epoch(epoch)", "bool True"], []),
    "set_epoch_string": ("TypeError", ["engine.set_epoch(epoch)", "str '2'"], []),
    "set_epoch_negative": ("ValueError", ["engine.set_epoch(epoch)", "got -1"], []),
    "disabled_section_not_checked_against_model": ("ok", ["(False, 1)"], []),
    "null_section_warns": ("ok", ["(False, 'FULL')"], ['"layer_drop_back": null', "OFF"]),
    "tied_weights_warned": ("ok", ["'embed'", "'norm'"], ["'embed.weight' is also 'head.weight'",
                                                          "keep_last = 1 keeps 'norm'", "never dropped"]),
    "full_load_of_plain_checkpoint": ("ValueError", ["saved with LDB off", "load_module_only=True",
                                                     "files unchanged: True", "weights unchanged: True"], []),
    "full_load_of_param_granularity_checkpoint": ("ValueError", ["granularity 'param'", "granularity 'module'",
                                                                 "load_module_only=True", "files unchanged: True",
                                                                 "weights unchanged: True"], []),
    # Not misuse: what the refusals above point to works.
    "adamw_object_rebuilt_per_unit": ("ok", ["('AdamW', 3, [0.01, 0.01, 0.01], [0.05, 0.05, 0.05], True, True)"], []),
    "callable_scheduler_drives_the_engines_optimizer": ("ok", ["[0.025, 0.025, 0.025]", "True"], []),
    # A DROP step must have dropped: a forward that bypassed the engine drew no mask.
    "module_called_directly_in_a_drop_epoch": ("RuntimeError", ["DROP-epoch step whose forward drew no mask",
                                                               "engine.module(x)", "engine.train()"], []),
    # DeepSpeed's torch-style backward at ZeRO 1-3 is a backward: the step runs, dropped units stay.
    "torch_style_backward_at_zero2": ("ok", ["(1, True, True, True)"], []),
    # LDB off: the requires_grad flags are the user's, as in plain DeepSpeed.
    "user_freeze_kept_with_ldb_off": ("ok", ["(False, True)"], []),
    # LDB on: the next mask would make the frozen layer trainable again; refused before that.
    "user_freeze_after_initialize_before_set_epoch": ("RuntimeError", [
        "'2.weight' (unit '2') was frozen", "found at set_epoch()", "before ldb_ds.initialize",
        "load_module_only=True", "after: (False, True)"], []),
    "user_freeze_after_initialize_after_set_epoch": ("RuntimeError", [
        "'2.weight' (unit '2') was frozen", "found at a DROP window", "after: (False, True)"], []),
    "scheduler_with_one_value_per_user_group": ("ok", ["ValueError",
        "Expected 6 lr_lambdas, but got 2", "6 param groups, one per (LDB unit, param group you gave)",
        "[g['name']] for g in opt.param_groups", "then: [0.05, 0.1]"], []),
    # Not misuse: what plain DeepSpeed users do (was: AttributeError "'function' object has no
    # attribute '__func__'" for the first, a torch warning that optimizer.step was overridden for the second).
    "torch_schedulers_at_zero0": ("ok", ["([[0.025], [0.025]], [])"], []),
    "no_set_epoch_warns": ("ok", ["(0, 2)"], ["without engine.set_epoch(epoch)", "no layer is ever dropped"]),
    "validation_forward_with_gradients_before_set_epoch": ("RuntimeError", [
        "middle of a gradient-accumulation window", "a validation forward in training mode", "torch.no_grad()"], []),
    "user_freeze_in_a_drop_epoch": ("RuntimeError", ["'0.weight' (unit '0') was frozen", "found at a DROP window",
                                                     "after: (False, True)"], []),
    "user_freeze_then_save_checkpoint": ("RuntimeError", [
        "'0.weight' (unit '0') was frozen", "found at a checkpoint save or load", "after: (False, True)"], []),
    "user_freeze_then_eval": ("RuntimeError", ["'0.weight' (unit '0') was frozen", "found at engine.eval()",
                                               "after: (False, True)"], []),
    # LDB off: a window runs on into the next epoch (DeepSpeed's way); LDB on: refused, with the fix.
    "partial_window_at_epoch_end": ("ok", ["'went on'", "not a multiple of gradient_accumulation_steps",
                                           "the loader ldb_ds.initialize returns does"], []),
}


@pytest.fixture(scope="module")
def engine_results():
    return run_distributed(run_engine_cases, 1, timeout=600)[0]


@pytest.mark.parametrize("name", sorted(ENGINE_MISUSE))
def test_engine_misuse_is_refused_naming_what_is_wrong(engine_results, name):
    kind, phrases, warned = ENGINE_MISUSE[name]
    got_kind, text, warning_texts = engine_results[name]
    assert got_kind == kind, (got_kind, text)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"
    for phrase in warned:
        assert any(phrase in w for w in warning_texts), (phrase, warning_texts)
    if not warned:
        assert not any("tied weights" in w or "null" in w for w in warning_texts), warning_texts


def test_every_engine_case_is_checked():
    from tests.support.bad_input_workers import ENGINE_CASES

    assert set(ENGINE_CASES) == set(ENGINE_MISUSE)
    assert len(BEFORE_DEEPSPEED) + len(ENGINE_MISUSE) >= 20
