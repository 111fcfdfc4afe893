"""The training application: ``ldb-train``, ``python -m ldb_ds.train``, ``launch/train.py``.

One module per job: the options (:mod:`.options`, one typed field each) and their sources
(:mod:`.arguments`: command line > ``-c`` YAML > the JSON's ``train`` section > defaults), the run
directory (:mod:`.rundir`), checkpoints (:mod:`.checkpoint`), the loop (:mod:`.loop`:
``train_one_epoch``, ``fit`` with step and epoch hooks), the TensorBoard monitor
(:mod:`.monitor`), the data wrappers (:mod:`.data`: seeded augmentation, skipped bad images)
and the wiring (:mod:`.main`). The datasets, models and evaluation it shares with ldb-bench are
:mod:`ldb_ds.workloads`. It imports the core and ``ldb_ds.workloads``, never ldb-bench, and is
never imported by either. Needs the ``train`` extra: ``pip install "ldb_ds[train]"``.
"""
