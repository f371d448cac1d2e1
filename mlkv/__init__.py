"""mlkv: larger-than-memory embedding tables for training, on a log-structured hash store.

>>> import mlkv
>>> store = mlkv.open("runs/emb", dim=64)            # doctest: +SKIP

``import mlkv`` never imports torch; the PyTorch modules live in ``mlkv.frameworks.torch``.
"""

from . import _jit  # noqa: F401  (sets Numba's cache directory before any kernel compiles)
from .errors import (ClosedStoreError, CorruptionError, DeviceError, MlkvError, ReadOnlyError,
                     SettingsMismatchError, StoreLockedError)
from .store import Store, open

__version__ = "0.1.0"

__all__ = ["open", "Store", "MlkvError", "ClosedStoreError", "CorruptionError", "DeviceError",
           "ReadOnlyError", "SettingsMismatchError", "StoreLockedError", "__version__"]
