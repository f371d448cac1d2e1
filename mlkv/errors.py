"""mlkv's exceptions.

Bad arguments raise the built-in a numpy user expects (``TypeError`` for a wrong dtype or
type, ``ValueError`` for a wrong shape or value, ``KeyError`` for missing keys in ``get``).
Everything about the store itself raises a subclass of :class:`MlkvError`.
"""


class MlkvError(Exception):
    """Base class of every error mlkv raises about a store."""


class ClosedStoreError(MlkvError):
    """An operation was called on a store after ``close()``."""


class SettingsMismatchError(MlkvError, ValueError):
    """A store was opened with settings (``dim``, ``dtype``, ...) other than those it was made with."""


class CorruptionError(MlkvError):
    """A store file is damaged or not a store file at all; the message names the file."""


class StoreLockedError(MlkvError):
    """Another process has the store open for writing."""


class ReadOnlyError(MlkvError):
    """A write was attempted on a store opened with ``readonly=True``."""


class DeviceError(MlkvError, OSError):
    """Reading or writing a segment file failed (short read, full disk, I/O error)."""
