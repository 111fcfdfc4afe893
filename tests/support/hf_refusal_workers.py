"""The LDBTrainer refusals and warnings, inside one real rank (tests/dist/test_hf_refusals.py).

Each case builds a real ``LDBTrainer`` over the tiny ViT of :mod:`tests.support.hf_workers`
and calls ``train()``; the test process gets back the error each raised (or None), and the
ldb_ds warnings of a run that reaches no DROP epoch.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from tests.support.hf_workers import Digits, ds_config, make_vit, training_args


def _lamb_bf16_auto_zero0() -> tuple[dict, dict]:
    # "auto" everywhere the Trainer fills in: bf16 comes from TrainingArguments(bf16=True).
    ds = ds_config(0)
    ds["bf16"] = {"enabled": "auto"}
    ds["optimizer"] = {"type": "Lamb", "params": {"lr": "auto", "weight_decay": "auto"}}
    return ds, {"bf16": True}


def trainer_refusals(rank: int, workdir: str) -> dict[str, Any]:
    """Per case: ``"<error type>: <message>"`` from ``LDBTrainer(...).train()``, or None if it trained."""
    from ldb_ds.integrations.hf import LDBTrainer

    cases = {
        "torch_compile": (ds_config(2), {"torch_compile": True, "torch_compile_backend": "eager"}),
        "lamb_bf16_zero0": _lamb_bf16_auto_zero0(),
        "batch_kappa": (ds_config(2, {"batch_kappa": 2}), {}),
    }
    errors: dict[str, Any] = {}
    for name, (ds, extra) in cases.items():
        try:
            trainer = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, name), ds,
                                                                    max_steps=1, **extra),
                                 train_dataset=Digits())
            trainer.train()
            errors[name] = None
        except ValueError as err:  # LDBUnsupportedError and LDBConfigError are ValueErrors
            errors[name] = f"{type(err).__name__}: {err}"

    # evaluate() before train() at ZeRO-3: the Trainer builds an inference engine and trains on it.
    trainer = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, "eval_first"), ds_config(3),
                                                              max_steps=1),
                         train_dataset=Digits(), eval_dataset=Digits(16))
    trainer.evaluate()
    try:
        trainer.train()
        errors["eval_first_zero3"] = None
    except RuntimeError as err:
        errors["eval_first_zero3"] = f"{type(err).__name__}: {err}"

    # One epoch, so no DROP epoch (sampling_rate 1: epoch 1 is the first), and an evaluation on
    # the training engine before the first step: what the eval-first error advises.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, "one_epoch"), ds_config(3),
                                                                  num_train_epochs=1, eval_on_start=True),
                             train_dataset=Digits(), eval_dataset=Digits(16))
        trainer.train()
    errors["one_epoch"] = {"warnings": [str(w.message) for w in seen if "ldb_ds" in str(w.message)],
                           "eval_on_start": [h for h in trainer.state.log_history if "eval_loss" in h],
                           "modes": trainer.ldb.mode.value, "steps": trainer.ldb.steps}
    return errors


__all__ = ["trainer_refusals"]
