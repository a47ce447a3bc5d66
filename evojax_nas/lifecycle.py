"""Process lifecycle: signals, a parent watchdog, renewed heartbeats, a graceful stop.

`evolve` owns its worker processes: however it ends, they end too. Each worker watches its
parent and exits when the parent is gone; its heartbeat is renewed while it lives, so that a
worker killed without warning stops counting as live within `LIVE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20.0  # a live worker renews its heartbeat at least this often
LIVE_SECONDS = 90.0  # a heartbeat older than this (and not renewed) is a worker that is gone


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def interrupts_end_the_process() -> Iterator[None]:
    """Ctrl-C, `kill -INT`, SIGTERM and SIGHUP raise KeyboardInterrupt (main thread only).

    A job started in the background by a non-interactive shell (`nohup … &`) inherits SIGINT
    ignored, and Python keeps it so; a `kill -INT` must still stop it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGHUP, _raise_terminated)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class GracefulStop:
    """A worker's stop request: the first SIGINT asks to stop between children, the second
    (or a SIGTERM/SIGHUP) interrupts the child in flight."""

    def __init__(self, announce: bool = False):
        self.requested = False
        self.reason = ""
        self._announce = announce
        self._signals = 0

    def install(self) -> GracefulStop:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.signal(signal.SIGHUP, _raise_terminated)
        return self

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason

    def _on_signal(self, signum, frame):
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        self.request("interrupted")
        if self._announce:
            with contextlib.suppress(OSError):
                print(
                    "stopping after the child in flight if the population needs it "
                    "(Ctrl-C again to drop it)",
                    file=sys.stderr,
                    flush=True,
                )


def watch_parent(parent_pid: int, poll_seconds: float = 1.0) -> threading.Thread:
    """Exits this process as soon as `parent_pid` is no longer its parent (the parent died).

    Nobody is left to read its progress or to stop it; the run's store stays consistent
    (an individual is published by one create-only write that comes last).
    """

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(3)

    thread = threading.Thread(target=watch, name="evojax-nas-parent-watchdog", daemon=True)
    thread.start()
    return thread


class Heartbeat:
    """Renews a worker's heartbeat every `HEARTBEAT_SECONDS`, also while a child trains.

    Wraps `store.heartbeat` so that the renewed beat repeats the worker's last one with a new
    time; `close()` writes a final beat marked `stopped`.
    """

    def __init__(self, store: Any, worker_id: int, interval: float = HEARTBEAT_SECONDS):
        self._store, self._worker_id, self._interval = store, worker_id, interval
        self._write = store.heartbeat
        self._last: dict = {"time": time.time(), "started": time.time()}
        self._lock = threading.Lock()
        self._done = threading.Event()
        store.heartbeat = self._beat  # the worker loop's own beats go through us
        self._beat(worker_id, {"action": "starting"})
        self._thread = threading.Thread(
            target=self._renew, name="evojax-nas-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self, worker_id: int, info: dict, renewal: bool = False) -> None:
        with self._lock:
            now = time.time()
            # `since`: when the worker's current action began; `time`: the latest renewal
            since = self._last.get("since") if renewal else info.get("time", now)
            self._last = {
                "started": self._last.get("started"),
                **info,
                "since": since,
                "time": now,
            }
            self._write(worker_id, self._last)

    def _renew(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._beat(self._worker_id, dict(self._last), renewal=True)
            except Exception as exc:  # a storage hiccup: the next renewal tries again
                log.info("heartbeat of worker %d not renewed: %s", self._worker_id, exc)

    def close(self, reason: str) -> None:
        self._done.set()
        try:
            self._beat(self._worker_id, {**self._last, "stopped": time.time(), "reason": reason})
        except Exception as exc:
            log.info("final heartbeat of worker %d not written: %s", self._worker_id, exc)


def is_live(beat: dict, now: float) -> bool:
    """A heartbeat of a worker still running: not stopped, and renewed recently."""
    stamp = beat.get("time")
    return not beat.get("stopped") and isinstance(stamp, int | float) and now - stamp < LIVE_SECONDS
