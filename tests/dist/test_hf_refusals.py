"""LDBTrainer refuses what ldb_ds.initialize refuses (ldb_ds/setup.py), and says what went wrong
where the Trainer's own flow is the cause; one real rank.

The Trainer reaches the core's set-up twice: ``create_optimizer`` (``plan_param_groups``, before
``deepspeed.initialize``, on the config with the Trainer's ``"auto"`` values filled in) and
``on_train_begin`` (``plan.attach``: the engine as Accelerate built and compiled it).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers: "
                                           "pip install 'ldb_ds[hf]'")
pytest.importorskip("accelerate", reason="the Hugging Face integration needs accelerate: pip install 'ldb_ds[hf]'")

from tests.support.dist import run_distributed  # noqa: E402
from tests.support.hf_refusal_workers import trainer_refusals  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    return run_distributed(trainer_refusals, 1, str(tmp_path_factory.mktemp("hf_refusals")), timeout=600)[0]


def test_torch_compile_is_refused_as_a_compiled_model_is_under_initialize(errors):
    # Accelerate compiles the engine after deepspeed.initialize; attach sees it and refuses.
    err = errors["torch_compile"]
    assert err and err.startswith("LDBUnsupportedError") and "engine.compile() is not supported" in err, err


def test_lamb_with_bf16_at_zero0_is_refused_with_the_trainers_auto_values(errors):
    # bf16.enabled "auto" becomes TrainingArguments(bf16=True): refused on what DeepSpeed will use.
    err = errors["lamb_bf16_zero0"]
    assert err and err.startswith("LDBUnsupportedError") and "Lamb optimizer with fp16/bf16 at ZeRO stage 0" in err


def test_batch_kappa_is_refused_under_the_trainer(errors):
    assert errors["batch_kappa"] and '"batch_kappa": 1' in errors["batch_kappa"]


def test_evaluate_before_train_at_zero3_names_the_inference_engine(errors):
    # Not ldb_ds's "needs an optimizer: give one in the DeepSpeed config", which would not help.
    err = errors["eval_first_zero3"]
    assert err and err.startswith("RuntimeError") and "needs an optimizer" not in err, err
    assert "evaluate()" in err and "inference-only DeepSpeed engine" in err and "Call trainer.train() first" in err


def test_a_run_without_a_drop_epoch_warns_once(errors):
    run = errors["one_epoch"]
    no_drop = [w for w in run["warnings"] if "LDB changes nothing" in w]
    assert len(no_drop) == 1, run["warnings"]
    assert "1 Trainer epoch(s)" in no_drop[0] and "first DROP epoch is epoch 1" in no_drop[0]
    assert run["modes"] == "FULL" and run["steps"] == 8  # 64 digits at 8 per step, all FULL
    # eval_on_start (the eval-first error's advice) evaluates at ZeRO-3 with LDB on.
    assert len(run["eval_on_start"]) == 1 and run["eval_on_start"][0]["step"] == 0
