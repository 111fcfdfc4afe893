"""ldb_ds: LayerDropBack for DeepSpeed.

>>> engine, optimizer, loader, scheduler = ldb_ds.initialize(model=model, config="ds_configs/zero2_ldb.json",
...                                                          training_data=train_set)
>>> for epoch in range(epochs):
...     engine.set_epoch(epoch)                  # FULL or DROP mode for this epoch
...     for x, y in loader:
...         loss = criterion(engine(x.to(engine.device)), y.to(engine.device))
...         engine.backward(loss)
...         engine.step()

Import order inside the package flows one way: ``config``/``schedule`` (pure
Python), ``units`` (torch), ``zero_hooks``/``engine`` (DeepSpeed).
"""

from .config import DEFAULTS, LDBConfig, LDBConfigError
from .schedule import Mode

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """See :func:`ldb_ds.engine.initialize` (imported lazily: DeepSpeed is slow to import)."""
    from .engine import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["initialize", "LDBConfig", "LDBConfigError", "Mode", "DEFAULTS", "__version__"]
