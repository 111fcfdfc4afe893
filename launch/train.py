#!/usr/bin/env python
"""Thin entry to ``ldb_ds.train`` for launchers that want a script path.

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json

Everything lives in :mod:`ldb_ds.train` (also ``python -m ldb_ds.train`` and ``ldb-train``).
"""

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # a checkout that was not pip-installed
    sys.path.insert(0, _REPO)

from ldb_ds.train.main import run  # noqa: E402

if __name__ == "__main__":
    run()
