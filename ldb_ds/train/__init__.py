"""The training application: ``ldb-train``, ``python -m ldb_ds.train``, ``launch/train.py``.

Datasets (:mod:`.data`), the model factory (:mod:`.models`), the TensorBoard
monitor (:mod:`.monitor`) and the training loop (:mod:`.main`). It imports the
core (``ldb_ds``) and is never imported by it. Needs the ``train`` extra:
``pip install "ldb_ds[train]"``.
"""
