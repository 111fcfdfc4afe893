"""Deprecated name of :mod:`ldb_ds.process`: importing it warns, and it goes in the next release."""

import warnings

from .process import *  # noqa: F401,F403 (the same objects)
from .process import __all__  # noqa: F401

warnings.warn("ldb_ds.runtime is deprecated: it is now ldb_ds.process (the same names); the old name goes in the "
              "next release", DeprecationWarning, stacklevel=2)
