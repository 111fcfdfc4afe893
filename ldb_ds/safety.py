"""Deprecated name of :mod:`ldb_ds.runtime_checks`: importing it warns, and it goes in the next release."""

import warnings

from .runtime_checks import *  # noqa: F401,F403 (the same objects)
from .runtime_checks import __all__  # noqa: F401

warnings.warn("ldb_ds.safety is deprecated: it is now ldb_ds.runtime_checks (the same names); the old name goes in the "
              "next release", DeprecationWarning, stacklevel=2)
