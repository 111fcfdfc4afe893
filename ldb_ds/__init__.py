"""ldb_ds: LayerDropBack for DeepSpeed.

>>> engine, optimizer, loader, scheduler = ldb_ds.initialize(model=model, config="ds_configs/zero2_ldb.json",
...                                                          training_data=train_set)
>>> for epoch in range(epochs):
...     engine.set_epoch(epoch)                  # FULL or DROP mode for this epoch
...     for x, y in loader:
...         loss = criterion(engine(x.to(engine.device)), y.to(engine.device))
...         engine.backward(loss)
...         engine.step()

The core is this package's top level; it needs torch and DeepSpeed only.
Imports flow one way: ``config``/``schedule`` (pure Python) -> ``units``, ``functional``,
``controller``, ``kept_gradient``, ``sampler``, ``checkpointing``, ``checkpoint_fit`` (torch) ->
``refusals`` (set-up),
``zero_hooks``, ``attach``, ``engine``, ``runtime_checks`` (while training), ``process`` (DeepSpeed).
The applications ``ldb_ds.train`` and ``ldb_ds.bench`` (and ``ldb_ds.integrations``) import the
core and are never imported by it. ``guards``, ``safety`` and ``runtime`` are the deprecated
names of ``refusals``, ``runtime_checks`` and ``process`` (importing them warns; they go in the
next release).
Everything that needs torch or DeepSpeed is imported on first use, so
``import ldb_ds`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import DEFAULTS, LDBConfig, LDBConfigError
from .schedule import Mode

__version__ = "0.2.0"

# name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "initialize": "engine",
    "LDBEngine": "engine",
    "LDBUnsupportedError": "refusals",
    "KeptUnitWithoutGradientError": "kept_gradient",
    "LDBState": "controller",
    "LDBController": "controller",
    "ScalableBatchSampler": "sampler",
    "build_dataloader": "sampler",
}
_SUBMODULES = ("functional", "units", "controller", "kept_gradient", "sampler", "refusals", "zero_hooks", "attach",
               "engine", "process", "checkpointing", "checkpoint_fit", "runtime_checks",
               "guards", "runtime", "safety")  # deprecated names of refusals, process, runtime_checks


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ldb_ds' has no attribute {name!r}")


__all__ = ["initialize", "LDBConfig", "LDBConfigError", "LDBUnsupportedError", "KeptUnitWithoutGradientError",
           "Mode", "DEFAULTS", "LDBEngine", "LDBState", "LDBController", "ScalableBatchSampler", "build_dataloader",
           "functional", "__version__"]
