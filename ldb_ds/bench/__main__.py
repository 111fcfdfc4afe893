"""``python -m ldb_ds.bench`` (and ``deepspeed --module ldb_ds.bench``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
