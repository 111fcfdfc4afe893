"""``python -m ldb_ds.bench`` (and ``deepspeed --module ldb_ds.bench``)."""

from .dispatch import run

if __name__ == "__main__":
    run()
