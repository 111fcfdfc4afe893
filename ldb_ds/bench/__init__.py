"""The benchmark application: ``ldb-bench`` / ``python -m ldb_ds.bench``.

Measures baseline DeepSpeed against ldb_ds side by side in one run and writes
JSON, Markdown, PNG and TensorBoard output (:mod:`.report`); counts gradient
bytes at DeepSpeed's communication backend (:mod:`.comm_count`). It imports the
core and the shared datasets and models (:mod:`ldb_ds.workloads`), never the training
application, and is never imported by either. Needs the ``bench`` extra.
"""
