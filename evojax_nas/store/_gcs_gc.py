"""The GCS backend's whole-history operations: `records()` and `gc()`.

Both list the `dead/` markers, whose number grows with the run: they are for reports and
periodic maintenance, not for the per-step path of the worker loop.
"""

import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from evojax_nas.errors import ConcurrencyError, CorruptObjectError, StoreError
from evojax_nas.store import _validate

log = logging.getLogger(__name__)

_CLAIM_GRACE = 60.0  # Seconds before a record without a marker is an interrupted publication.
_DEAD_FIELDS = "items(name,metadata,generation,timeCreated),nextPageToken"


class GCSRecordsMixin:
    """`records()` and `gc()` for GCSStore (uses its private primitives)."""

    # concurrent reads in `records()` (1: one after another); fewer than the HTTP connection
    # pool of the client (requests: 10), which otherwise logs a warning per extra connection
    record_readers = 8

    def _alive_ids(self) -> dict[str, str]:
        # One population listing; it also records each live ID's marker name.
        return {m.id: self._names[m.id] for m in self.population()}

    def _dead(self) -> dict:
        dead = {}
        for blob in self._list("dead/", _DEAD_FIELDS):
            ind_id = self._rel(blob, "dead/")
            if _validate.ID_RE.match(ind_id) and ".." not in ind_id:
                dead[ind_id] = blob
            else:
                log.warning("skipping malformed kill marker %s", blob.name)
        return dead

    def individual_ids(self) -> list[str]:
        return sorted(set(self._alive_ids()) | set(self._dead()))

    def records(self) -> list[dict]:
        """Returns the record of every individual ever published, with "id" and "alive".

        One read per individual, `record_readers` at a time: each waits on a round trip, so on
        a long run (`status`, `report`, a worker joining) reading them one after another takes
        minutes. `python scripts/bench_store_records.py` measures the two ways.
        """
        alive, dead = self._alive_ids(), self._dead()

        def read(ind_id: str) -> dict:
            try:
                record = self.read_record(ind_id)
            except StoreError as e:
                log.warning("record of %s unreadable: %s", ind_id, e)
                record = {"error": str(e)}
            return record | {"id": ind_id, "alive": ind_id not in dead}

        ids = sorted(set(alive) | set(dead))
        readers = min(self.record_readers, len(ids))
        if readers <= 1:
            return [read(i) for i in ids]
        with ThreadPoolExecutor(readers, thread_name_prefix="records") as pool:
            return list(pool.map(read, ids))

    def gc(self, grace_seconds: float) -> int:
        """Deletes checkpoints of individuals killed more than `grace_seconds` ago."""
        now = datetime.datetime.now(datetime.UTC)
        collected = 0
        for ind_id, blob in self._dead().items():
            meta = blob.metadata or {}
            if meta.get("collected") == "1":
                continue
            if (now - blob.time_created).total_seconds() < grace_seconds:
                continue
            if self._collect(ind_id, blob.generation, meta.get("marker", "")):
                collected += 1
        if time.time() - getattr(self, "_last_deep_gc", 0.0) >= max(grace_seconds, 1.0):
            self._last_deep_gc = time.time()
            collected += self._gc_interrupted(now, grace_seconds)
        return collected

    def _gc_interrupted(self, now: datetime.datetime, grace_seconds: float) -> int:
        """Removes publications interrupted between claim and marker (a record, no alive or
        kill marker) and kills phantom markers (DNA or checkpoint gone), after the grace."""
        files: dict[str, set[str]] = {}
        created: dict[str, datetime.datetime] = {}
        for blob in self._list("ind/", "items(name,timeCreated),nextPageToken"):
            ind_id, _, rest = self._rel(blob, "ind/").partition("/")
            files.setdefault(ind_id, set()).add(rest.split("/")[0])
            if rest == "record.json":
                created[ind_id] = blob.time_created
        alive, dead = self._alive_ids(), self._dead()
        claim_grace = max(grace_seconds, _CLAIM_GRACE)
        collected = 0
        for ind_id in created:
            if ind_id in alive or ind_id in dead:
                continue
            if (now - created[ind_id]).total_seconds() < claim_grace:
                continue
            log.warning("gc: removing interrupted publication %s", self._gs(f"ind/{ind_id}/"))
            for blob in self._list(f"ind/{ind_id}/"):
                self._delete(blob.name[len(self._key("")) :])
            collected += 1
        for ind_id, name in alive.items():
            birth = _validate.parse_marker(name)[2] / 1e9
            whole = {"dna.json", "ckpt"} <= files.get(ind_id, set())
            if not whole and now.timestamp() - birth >= grace_seconds:
                collected += self._kill_phantom(ind_id)
        return collected

    def _collect(self, ind_id: str, generation: int, marker: str) -> bool:
        try:  # A leftover alive marker means its killer died between its two writes.
            if _validate.parse_marker(marker)[0] == ind_id:
                self._delete(f"pop/{marker}")
        except CorruptObjectError:
            log.warning("kill marker of %s names a malformed marker %r", ind_id, marker)
        for blob in self._list(f"ind/{ind_id}/ckpt/"):
            self._delete(blob.name[len(self._key("")) :])
        info = {"id": ind_id, "marker": marker, "collected": time.time()}
        try:  # Compare-and-swap: of several concurrent gcs, one counts the collection.
            self._put(
                f"dead/{ind_id}",
                _validate.dumps(info, "gc"),
                generation,
                marker=marker,
                collected="1",
            )
        except ConcurrencyError:
            return False
        return True
