"""``python -m ldb_ds.train`` (and the ``deepspeed --module ldb_ds.train`` launcher form)."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
