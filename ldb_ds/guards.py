"""Deprecated name of :mod:`ldb_ds.refusals`: importing it warns, and it goes in the next release."""

import warnings

from .refusals import *  # noqa: F401,F403 (the same objects)
from .refusals import __all__  # noqa: F401

warnings.warn("ldb_ds.guards is deprecated: it is now ldb_ds.refusals (the same names); the old name goes in the "
              "next release", DeprecationWarning, stacklevel=2)
