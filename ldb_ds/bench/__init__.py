"""The benchmark application: ``ldb-bench`` / ``python -m ldb_ds.bench``.

Measures baseline DeepSpeed against ldb_ds side by side in one run and writes
JSON, Markdown, PNG and TensorBoard output (:mod:`.report`); counts gradient
bytes at DeepSpeed's communication backend (:mod:`.comm_count`). It imports the
core and is never imported by it. Needs the ``bench`` extra.
"""
