"""Integrations of ldb_ds with other trainers; the only place that imports them.

* :mod:`ldb_ds.integrations.hf` - Hugging Face ``transformers.Trainer`` (:class:`LDBTrainer`)
  and Accelerate (a recipe on :func:`plan_param_groups`); needs ``pip install "ldb_ds[hf]"``.

The core (``ldb_ds``) never imports this package (docs/design.md, section 2).
"""
