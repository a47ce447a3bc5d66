"""The population store interface shared by the local-directory and GCS backends.

An individual is born (`publish`) by writing its DNA, record and checkpoint, then creating a
create-only *marker* whose name carries its ID, fitness and birth stamp (paper footnote 2), so
one listing gives the whole live population. Killing is an exclusive state change of that
marker; garbage collection removes dead checkpoints after a grace period and keeps every record.
"""

import abc
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from evojax_nas.errors import ConcurrencyError, StoreError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Member:
    """One entry of a population listing; every field comes from the listing itself.

    Attributes:
        id: the individual's ID, chosen by its creator (e.g. "w003-e000042").
        fitness: validation accuracy in [0, 1].
        birth: `time.time_ns()` at publication, for aging selection.
    """

    id: str
    fitness: float
    birth: int


class Store(abc.ABC):
    """A run's shared population: the only channel through which workers coordinate.

    Attributes:
        url: the store's address; `open_store(url)` opens the same store.
        requests: number of backend requests made by this object (listing pages, reads,
            writes, deletes, renames), for measuring the protocol's cost.
    """

    url: str
    requests: int

    @abc.abstractmethod
    def write_config(self, config: dict) -> bool:
        """Creates the run's `config.json`; returns False (and writes nothing) if one exists."""

    @abc.abstractmethod
    def read_config(self) -> dict:
        """Returns the run's config; raises NotFoundError if the run does not exist."""

    @abc.abstractmethod
    def publish(self, ind_id: str, dna: dict, record: dict, fitness: float, params: Any) -> None:
        """Atomically adds a new live individual.

        Args:
            ind_id: the new individual's ID (validated; never reused).
            dna: its DNA as a JSON dict.
            record: its small record (parent, mutations, FLOPs, times...); "id" is added.
            fitness: validation accuracy in [0, 1].
            params: nested dict of numpy arrays, or None for "no weights".

        Raises:
            ConcurrencyError: `ind_id` already exists (or a partial publication claimed it).
            StoreError: an argument is invalid.
        """

    @abc.abstractmethod
    def population(self) -> list[Member]:
        """Lists the live individuals with O(1) requests (one listing)."""

    @abc.abstractmethod
    def kill(self, ind_id: str) -> None:
        """Kills a live individual; exactly one of several concurrent killers succeeds.

        Raises:
            ConcurrencyError: it is already dead (another worker got there first).
            NotFoundError: it was never published.
        """

    @abc.abstractmethod
    def read_dna(self, ind_id: str) -> dict:
        """Returns an individual's DNA (alive, dead or collected)."""

    @abc.abstractmethod
    def read_record(self, ind_id: str) -> dict:
        """Returns an individual's record (alive, dead or collected), with "id" set."""

    @abc.abstractmethod
    def read_params(self, ind_id: str, max_bytes: int | None = None) -> Any:
        """Returns an individual's weights (nested dict of numpy arrays) or None.

        Args:
            ind_id: the individual.
            max_bytes: refuse (CheckpointError), before loading it, a checkpoint whose arrays
                hold more bytes (e.g. what its DNA implies); None means a generous global bound.

        Raises:
            NotFoundError: no such individual, or its checkpoint was garbage-collected.
            CheckpointError: the checkpoint is corrupt or truncated.
        """

    @abc.abstractmethod
    def records(self) -> list[dict]:
        """Returns the record of every individual ever published, with "id" and "alive"."""

    @abc.abstractmethod
    def individual_ids(self) -> list[str]:
        """The IDs of every individual ever published, alive or killed, sorted: from listings
        only, without reading a record (one request per individual on GCS), so that counting a
        run's children stays cheap however long the run."""

    @abc.abstractmethod
    def heartbeat(self, worker_id: int, info: dict) -> None:
        """Overwrites worker `worker_id`'s in-flight marker with `info`."""

    @abc.abstractmethod
    def workers(self, recent_seconds: float | None = None) -> list[dict]:
        """Returns each worker's latest heartbeat, with "worker" set to its ID.

        Args:
            recent_seconds: only heartbeats written this recently (judged from the listing,
                so that old workers cost no reads).
        """

    @abc.abstractmethod
    def read_meta(self, name: str) -> tuple[dict | None, Any]:
        """Returns (value or None, version token) of a small run-wide JSON side file."""

    @abc.abstractmethod
    def write_meta(self, name: str, value: dict, expected_version: Any = None) -> None:
        """Compare-and-swap write of a side file.

        Args:
            name: the side file's name (validated like an ID).
            value: the new JSON dict.
            expected_version: the token `read_meta` returned; None means "must not exist".

        Raises:
            ConcurrencyError: the file's current version is not `expected_version`.
        """

    def update_meta(
        self,
        name: str,
        change: Callable[[dict | None], dict],
        *,
        attempts: int | None = 20,
        pause: float = 0.0,
    ) -> dict:
        """Read-modify-write of a side file with compare-and-swap, retried on a lost race.

        Args:
            name: the side file's name.
            change: the new value from the current one (None when there is none); it may run
                more than once (once per attempt), so it must not have side effects that add up.
            attempts: how many lost races to retry; None retries until it wins.
            pause: seconds to wait after a lost race.

        Returns:
            The value written.

        Raises:
            ConcurrencyError: every attempt lost its race.
        """
        tried = 0
        while attempts is None or tried < attempts:
            tried += 1
            value, version = self.read_meta(name)
            new = change(value)
            try:
                self.write_meta(name, new, expected_version=version)
                return new
            except ConcurrencyError:
                if pause:
                    time.sleep(pause)
        raise ConcurrencyError(f"could not update meta/{name}: {tried} concurrent writes won")

    @abc.abstractmethod
    def gc(self, grace_seconds: float) -> int:
        """Deletes checkpoints of individuals killed more than `grace_seconds` ago.

        Also (after the grace period) removes publications interrupted between claiming their
        ID and their marker, and kills phantom markers whose DNA or checkpoint is gone.

        Returns:
            How many individuals were collected by this call. Records and DNA are kept.
        """

    def _kill_phantom(self, ind_id: str) -> bool:
        """gc: kills a listed individual whose DNA or checkpoint is gone; True if it did."""
        log.warning("gc: killing phantom %s: its DNA or checkpoint is gone", ind_id)
        try:
            self.kill(ind_id)
            return True
        except StoreError:
            return False  # killed meanwhile, or it cannot be killed: either way it is out

    # Blobs: immutable files shared by the run's workers (compiled programs, the training state
    # of children in flight). Create-only, so a blob once visible never changes, and a blob is
    # visible whole or not at all; a backend that cannot hold them raises NotImplementedError.

    def write_blob(self, name: str, data: bytes) -> None:
        """Creates blob `name` (`programs/<key>/<file>` or `resume/<key>/<file>`) holding `data`.

        Raises:
            ConcurrencyError: the blob exists already.
        """
        raise NotImplementedError(f"{type(self).__name__} holds no blobs")

    def read_blob(self, name: str, max_bytes: int) -> bytes:
        """Returns blob `name`.

        Raises:
            NotFoundError: there is no such blob.
            CorruptObjectError: it is larger than `max_bytes`.
        """
        raise NotImplementedError(f"{type(self).__name__} holds no blobs")

    def delete_blob(self, name: str) -> None:
        """Deletes blob `name` if it exists (releases a claim)."""
        raise NotImplementedError(f"{type(self).__name__} holds no blobs")

    def list_blobs(self, prefix: str) -> list[str]:
        """The names of the blobs under `prefix` (`<dir>` or `<dir>/<key>`), sorted.

        One listing request per page; names that are not valid blob names are skipped.
        """
        raise NotImplementedError(f"{type(self).__name__} holds no blobs")
