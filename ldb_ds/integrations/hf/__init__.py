"""LayerDropBack inside Hugging Face ``transformers.Trainer`` and Accelerate on DeepSpeed.

Needs ``pip install "ldb_ds[hf]"``. Both read the ``layer_drop_back`` section of the same
DeepSpeed JSON the run already uses.

Trainer: replace ``Trainer`` by :class:`LDBTrainer` (same arguments)::

    from ldb_ds.integrations.hf import LDBTrainer
    trainer = LDBTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    trainer.train()

Accelerate (``accelerator.prepare`` with a ``DeepSpeedPlugin``)::

    plan = plan_param_groups(model, "ds_config.json", param_groups)   # one group per LDB unit
    optimizer = torch.optim.AdamW(plan.groups, lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ldb = plan.attach(model)                                          # model: the DeepSpeed engine
    for epoch in range(epochs):
        ldb.set_epoch(epoch)
        for batch in loader: ...                                       # the usual accumulate/backward/step

Both are built on the core's functions: units and groups (:mod:`ldb_ds.units`), the controller
(:mod:`ldb_ds.controller`) and hooks on the DeepSpeed engine (:mod:`ldb_ds.attach`).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LDBTrainer": "trainer",
    "LDBPlan": "plan",
    "plan_param_groups": "plan",
    "check_supported": "plan",
    "LogWindow": "logs",
    "ldb_log_values": "logs",
}


def __getattr__(name: str) -> Any:
    # transformers is imported only with LDBTrainer: the Accelerate recipe needs none of it.
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
