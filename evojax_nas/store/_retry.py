"""A store wrapper that waits out storage outages of any length.

A worker must survive a frozen storage service, a full disk or a flaky network mount: every
store call is retried with capped exponential backoff for as long as the failure is
*transient* (an OSError such as ENOSPC or a dropped connection, a GCS 429/5xx or an exhausted
client-side retry), logging that it is waiting. Errors of the protocol or of the data
(ConcurrencyError, NotFoundError, CorruptObjectError, CheckpointError, a bad argument) and
permission errors are raised at once: waiting cannot fix them.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from evojax_nas.errors import EvojaxNasError
from evojax_nas.store.base import Store

log = logging.getLogger(__name__)

_GCS_TRANSIENT = {
    "RetryError",
    "ServerError",
    "InternalServerError",
    "BadGateway",
    "ServiceUnavailable",
    "GatewayTimeout",
    "TooManyRequests",
    "DeadlineExceeded",
}
_PERMANENT_ERRNO = {  # what waiting cannot fix: permissions, or the store's own layout damaged
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EEXIST,
    errno.ENOTEMPTY,
}


def is_transient(exc: BaseException) -> bool:
    """True for a failure that may go away by itself (outage, full disk, throttling)."""
    if isinstance(exc, EvojaxNasError):
        return False
    if isinstance(exc, OSError):  # includes requests' ConnectionError and Timeout
        return exc.errno not in _PERMANENT_ERRNO
    gexc = sys.modules.get("google.api_core.exceptions")
    if gexc is not None and isinstance(exc, gexc.GoogleAPIError):
        return any(type(exc).__name__ == n or _has_base(exc, n) for n in _GCS_TRANSIENT)
    return isinstance(exc, ConnectionError | TimeoutError)


def _has_base(exc: BaseException, name: str) -> bool:
    return any(c.__name__ == name for c in type(exc).__mro__)


def retry_forever(
    fn: Callable,
    what: str,
    *,
    first: float = 0.5,
    cap: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: Callable[[str], None] | None = None,
) -> Any:
    """Calls `fn()` until it returns or raises a non-transient error, backing off meanwhile."""
    delay, start, attempt = first, time.time(), 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            message = (
                f"storage unavailable for {what} ({type(exc).__name__}: {exc}); waiting "
                f"{delay:.1f} s (attempt {attempt}, {time.time() - start:.0f} s so far)"
            )
            log.warning(message)
            if on_wait is not None:
                on_wait(message)
            sleep(delay)
            delay = min(cap, delay * 2)


class RetryingStore(Store):
    """Wraps a store so that each call outlasts transient storage failures.

    Every other attribute (url, requests, root, ...) is the wrapped store's.
    """

    def __init__(self, inner: Store, **retry_options: Any):
        self._inner = inner
        self._options = retry_options

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def requests(self) -> int:
        return self._inner.requests

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._inner, name)
        return retry_forever(functools.partial(method, *args, **kwargs), name, **self._options)

    def write_config(self, config):
        return self._call("write_config", config)

    def read_config(self):
        return self._call("read_config")

    def publish(self, ind_id, dna, record, fitness, params):
        return self._call("publish", ind_id, dna, record, fitness, params)

    def population(self):
        return self._call("population")

    def kill(self, ind_id):
        return self._call("kill", ind_id)

    def read_dna(self, ind_id):
        return self._call("read_dna", ind_id)

    def read_record(self, ind_id):
        return self._call("read_record", ind_id)

    def read_params(self, ind_id, max_bytes=None):
        return self._call("read_params", ind_id, max_bytes)

    def records(self):
        return self._call("records")

    def individual_ids(self):
        return self._call("individual_ids")

    def heartbeat(self, worker_id, info):
        return self._call("heartbeat", worker_id, info)

    def workers(self, recent_seconds=None):
        return self._call("workers", recent_seconds)

    def read_meta(self, name):
        return self._call("read_meta", name)

    def write_meta(self, name, value, expected_version=None):
        return self._call("write_meta", name, value, expected_version)

    def gc(self, grace_seconds):
        return self._call("gc", grace_seconds)

    def write_blob(self, name, data):
        return self._call("write_blob", name, data)

    def read_blob(self, name, max_bytes):
        return self._call("read_blob", name, max_bytes)

    def delete_blob(self, name):
        return self._call("delete_blob", name)

    def list_blobs(self, prefix):
        return self._call("list_blobs", prefix)


def retrying(store: Store, **retry_options: Any) -> Store:
    """`store`, each of whose calls waits out transient failures (see RetryingStore)."""
    return store if isinstance(store, RetryingStore) else RetryingStore(store, **retry_options)
