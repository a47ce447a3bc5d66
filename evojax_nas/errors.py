"""Exception types for errors a user can cause.

Each carries a message that says what went wrong and what to do; the CLI prints them on one line
without a traceback and exits with code 2.
"""


class EvojaxNasError(Exception):
    """Base class of every error this package raises on purpose."""


class DNAError(EvojaxNasError, ValueError):
    """A DNA is malformed: cycle, dangling edge, bad value, unknown type, bad JSON."""


class DataError(EvojaxNasError, ValueError):
    """A dataset is missing or malformed."""


class ConfigError(EvojaxNasError, ValueError):
    """A run configuration is malformed."""


class StoreError(EvojaxNasError):
    """A population store could not be read or written."""


class ConcurrencyError(StoreError):
    """Another worker got there first (individual already killed, a create-only write lost).

    The worker loop abandons its step and continues; it is not a failure.
    """


class CorruptObjectError(StoreError):
    """An object in the store is truncated, not valid JSON, or fails validation."""


class NotFoundError(StoreError):
    """An individual, record or checkpoint does not exist in the store."""


class PublishingError(EvojaxNasError):
    """A worker's publications keep failing for a reason that is not the store's (e.g. a
    checkpoint library this code does not work with): it stops rather than train children that
    are all lost."""


class CheckpointError(EvojaxNasError):
    """A weight checkpoint is missing, corrupt, or does not match its DNA."""


class ReportError(EvojaxNasError):
    """A run cannot be reported on or compared (no individuals, bad arguments)."""
