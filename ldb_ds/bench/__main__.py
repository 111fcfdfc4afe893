"""``python -m ldb_ds.bench`` (and ``deepspeed --module ldb_ds.bench``)."""

from .cli import run

if __name__ == "__main__":
    run()
