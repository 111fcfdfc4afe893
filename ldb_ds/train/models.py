"""Moved to :mod:`ldb_ds.workloads.models` (the model factory ldb-train and ldb-bench share).

The old names still import from here for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from ldb_ds.workloads import models as _models


def __getattr__(name: str) -> Any:
    # PEP 562: every public name of the moved module, served with a warning for one release.
    if name in _models.__all__:
        warnings.warn(f"ldb_ds.train.models.{name} moved to ldb_ds.workloads.models.{name}; the old name "
                      "goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_models.__all__)  # a star import gets them too (each with the warning)
