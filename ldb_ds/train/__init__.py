"""The training application: ``ldb-train``, ``python -m ldb_ds.train``, ``launch/train.py``.

One module per job: the options (:mod:`.options`, one typed field each) and their sources
(:mod:`.cli`: command line > ``-c`` YAML > the JSON's ``train`` section > defaults), the run
directory (:mod:`.rundir`), checkpoints (:mod:`.checkpoint`), the loop (:mod:`.loop`:
``train_one_epoch``, ``validate``, ``fit`` with step and epoch hooks), the TensorBoard monitor
(:mod:`.monitor`), datasets (:mod:`.data`), the model factory (:mod:`.models`) and the wiring
(:mod:`.main`). It imports the core (``ldb_ds``) and is never imported by it. Needs the
``train`` extra: ``pip install "ldb_ds[train]"``.
"""
