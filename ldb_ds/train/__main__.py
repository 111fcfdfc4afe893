"""``python -m ldb_ds.train`` (and the ``deepspeed --module ldb_ds.train`` launcher form)."""

from .main import run

if __name__ == "__main__":
    run()
