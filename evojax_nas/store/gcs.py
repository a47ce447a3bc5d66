"""GCS backend (`gs://bucket/prefix`) built on conditional uploads.

Layout under the prefix:

    config.json                 create-only (if_generation_match=0)
    ind/<id>/record.json        create-only: claims the ID; then dna.json and ckpt/<orbax files>
    pop/<id>@<fitness>@<birth>  empty alive marker, create-only, uploaded last (birth)
    dead/<id>                   create-only kill marker: the first writer wins (kill); gc later
                                rewrites it (compare-and-swap) with metadata collected=1
    meta/<name>.json            compare-and-swap on the object generation
    workers/<n>.json            heartbeats (plain overwrite)
    programs/, resume/          blobs (create-only): compiled programs, in-flight children

Only uploads carry preconditions (the emulator ignores them on delete/copy/rewrite/compose).
Retries: reads, listings, deletes and uploads of immutable or last-writer-wins content are
idempotent and retried. Conditional uploads are retried too, and a 412 after a retry is
resolved by reading back the object's `writer` token: if it is ours, our first attempt won.
"""

import datetime
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    CorruptObjectError,
    NotFoundError,
    StoreError,
)
from evojax_nas.store import _checkpoint, _validate
from evojax_nas.store._gcs_gc import GCSRecordsMixin
from evojax_nas.store.base import Member, Store

log = logging.getLogger(__name__)

_LIST_FIELDS = "items(name),nextPageToken"
_COUNT_LOCK = threading.Lock()
_MAX_CKPT_FILES = 256
_FILE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class GCSStore(GCSRecordsMixin, Store):
    """A population store in a GCS bucket (or the emulator named by STORAGE_EMULATOR_HOST)."""

    def __init__(self, url: str, client: storage.Client | None = None):
        """Opens `gs://bucket/prefix`; the bucket must exist."""
        if not url.startswith("gs://") or not url[5:].split("/")[0]:
            raise StoreError(f"not a GCS URL: {url!r} (expected gs://bucket/prefix)")
        bucket, _, prefix = url[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}".rstrip("/")
        self.requests = 0
        self._client = client or storage.Client()
        self._bucket = self._client.bucket(bucket)
        self._names: dict[str, str] = {}  # ID -> alive marker name; names never change.

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _gs(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # -- primitives -------------------------------------------------------------------------

    def _list(self, rel_prefix: str, fields: str = _LIST_FIELDS) -> list[storage.Blob]:
        """All objects under `rel_prefix`; one request per page of 1,000."""
        it = self._client.list_blobs(
            self._bucket, prefix=self._key(rel_prefix), fields=fields, retry=DEFAULT_RETRY
        )
        blobs = []
        for page in it.pages:
            self.requests += 1
            blobs.extend(page)
        return blobs

    def _rel(self, blob: storage.Blob, rel_prefix: str) -> str:
        return blob.name[len(self._key(rel_prefix)) :]

    def _get(self, rel: str) -> bytes:
        with _COUNT_LOCK:  # `records()` reads on several threads
            self.requests += 1
        try:
            blob = self._bucket.blob(self._key(rel))  # at most one byte over the limit is read
            return blob.download_as_bytes(end=_validate.MAX_JSON_BYTES, retry=DEFAULT_RETRY)
        except gexc.NotFound:
            raise NotFoundError(f"{self._gs(rel)} does not exist") from None

    def _get_json(self, rel: str) -> dict:
        return _validate.loads(self._get(rel), self._gs(rel))

    def _put(self, rel: str, data: bytes, generation: int | None = None, **metadata: str) -> None:
        """Uploads `data`; with `generation`, only if the object's generation matches it.

        Raises:
            ConcurrencyError: the precondition failed and the object is not our own write.
        """
        blob = self._bucket.blob(self._key(rel))
        token = uuid.uuid4().hex
        blob.metadata = metadata | {"writer": token}
        self.requests += 1
        try:
            blob.upload_from_string(data, if_generation_match=generation, retry=DEFAULT_RETRY)
        except gexc.PreconditionFailed:
            self.requests += 1
            current = self._bucket.get_blob(self._key(rel), retry=DEFAULT_RETRY)
            if current is None or (current.metadata or {}).get("writer") != token:
                raise ConcurrencyError(f"{self._gs(rel)} was written by another worker") from None

    def _delete(self, rel: str) -> None:
        self.requests += 1
        try:
            self._bucket.blob(self._key(rel)).delete(retry=DEFAULT_RETRY)
        except gexc.NotFound:
            pass

    # -- config -----------------------------------------------------------------------------

    def write_config(self, config: dict) -> bool:
        try:
            self._put("config.json", _validate.dumps(config, "config"), generation=0)
            return True
        except ConcurrencyError:
            return False

    def read_config(self) -> dict:
        try:
            return self._get_json("config.json")
        except NotFoundError:
            raise NotFoundError(f"no run at {self.url}: config.json is missing") from None

    # -- individuals ------------------------------------------------------------------------

    def publish(self, ind_id: str, dna: dict, record: dict, fitness: float, params: Any) -> None:
        fitness, dna_bytes, record_bytes = _validate.publication(ind_id, dna, record, fitness)
        with tempfile.TemporaryDirectory() as tmp:
            _checkpoint.save(params, os.path.join(tmp, "ckpt"))
            try:  # The create-only record claims the ID.
                self._put(f"ind/{ind_id}/record.json", record_bytes, generation=0)
            except ConcurrencyError:
                raise ConcurrencyError(
                    f"individual {ind_id} already exists in {self.url}"
                ) from None
            self._put(f"ind/{ind_id}/dna.json", dna_bytes)
            for root, _, files in os.walk(tmp):
                for f in files:
                    path = os.path.join(root, f)
                    rel = os.path.relpath(path, tmp).replace(os.sep, "/")
                    self.requests += 1
                    blob = self._bucket.blob(self._key(f"ind/{ind_id}/{rel}"))
                    blob.upload_from_filename(path, retry=DEFAULT_RETRY)
        name = _validate.marker_name(ind_id, fitness, time.time_ns())
        self._put(f"pop/{name}", b"", generation=0)  # Birth: the individual is now visible.
        self._names[ind_id] = name

    def population(self) -> list[Member]:
        members = []
        for blob in self._list("pop/"):
            try:
                ind_id, fitness, birth = _validate.parse_marker(self._rel(blob, "pop/"))
            except CorruptObjectError as e:
                log.warning("skipping %s", e)
                continue
            self._names[ind_id] = self._rel(blob, "pop/")
            members.append(Member(ind_id, fitness, birth))
        return sorted(members, key=lambda m: m.id)

    def _find(self, ind_id: str) -> str | None:
        """The alive marker name of `ind_id` (one small listing on a cache miss), or None."""
        if ind_id not in self._names:
            for blob in self._list(f"pop/{ind_id}{_validate.SEP}"):
                self._names[ind_id] = self._rel(blob, "pop/")
        return self._names.get(ind_id)

    def _dead_blob(self, ind_id: str) -> storage.Blob | None:
        self.requests += 1
        return self._bucket.get_blob(self._key(f"dead/{ind_id}"), retry=DEFAULT_RETRY)

    def kill(self, ind_id: str) -> None:
        _validate.check_id(ind_id)
        name = self._find(ind_id)
        if name is None:
            if self._dead_blob(ind_id) is not None:
                raise ConcurrencyError(f"individual {ind_id} was already killed")
            raise NotFoundError(f"individual {ind_id} does not exist in {self.url}")
        info = {"id": ind_id, "marker": name, "killed": time.time()}
        try:
            self._put(f"dead/{ind_id}", _validate.dumps(info, "kill"), 0, marker=name)
        except ConcurrencyError:
            self._delete(f"pop/{name}")  # Repairs a killer that died before its delete.
            raise ConcurrencyError(f"individual {ind_id} was already killed") from None
        self._delete(f"pop/{name}")

    def read_dna(self, ind_id: str) -> dict:
        return self._get_json(f"ind/{_validate.check_id(ind_id)}/dna.json")

    def read_record(self, ind_id: str) -> dict:
        rel = f"ind/{_validate.check_id(ind_id)}/record.json"
        return _validate.check_record(self._get_json(rel), ind_id, self._gs(rel))

    def read_params(self, ind_id: str, max_bytes: int | None = None) -> Any:
        rel = f"ind/{_validate.check_id(ind_id)}/ckpt/"
        blobs = self._list(rel, "items(name,size),nextPageToken")
        if not blobs:
            dead = self._dead_blob(ind_id)
            if dead is not None and (dead.metadata or {}).get("collected") == "1":
                raise NotFoundError(f"checkpoint {self._gs(rel)} was garbage-collected")
            raise NotFoundError(f"no checkpoint at {self._gs(rel)}")
        limit = 2 * (_checkpoint.MAX_BYTES if max_bytes is None else max_bytes) + (1 << 20)
        size = sum(int(b.size or 0) for b in blobs)
        if len(blobs) > _MAX_CKPT_FILES or size > limit:
            raise CheckpointError(f"{self._gs(rel)} has {len(blobs)} files, {size} bytes")
        with tempfile.TemporaryDirectory() as tmp:
            for blob in blobs:
                path = _safe_path(tmp, self._rel(blob, rel), self._gs(rel))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self.requests += 1
                try:
                    blob.download_to_filename(path, retry=DEFAULT_RETRY)
                except gexc.NotFound:
                    raise NotFoundError(f"checkpoint {self._gs(rel)} vanished (gc?)") from None
            return _checkpoint.restore(tmp, self._gs(rel), max_bytes)

    # -- workers and side files -------------------------------------------------------------

    def heartbeat(self, worker_id: int, info: dict) -> None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise StoreError(f"worker_id must be a non-negative int, got {worker_id!r}")
        data = _validate.dumps(dict(info) | {"worker": worker_id}, "heartbeat")
        self._put(f"workers/{worker_id}.json", data)

    def workers(self, recent_seconds: float | None = None) -> list[dict]:
        out, now = [], datetime.datetime.now(datetime.UTC)
        for blob in self._list("workers/", "items(name,updated),nextPageToken"):
            try:
                name = _validate.check_id(self._rel(blob, "workers/"), "file name")
                if recent_seconds is not None and blob.updated is not None:
                    if (now - blob.updated).total_seconds() > recent_seconds:
                        continue  # judged from the listing: old workers cost no reads
                heartbeat = self._get_json(f"workers/{name}")
                out.append(_validate.check_heartbeat(heartbeat, name))
            except StoreError as e:
                log.warning("skipping heartbeat: %s", e)
        return sorted(out, key=lambda w: w["worker"])

    def read_meta(self, name: str) -> tuple[dict | None, Any]:
        rel = f"meta/{_validate.check_id(name, 'meta name')}.json"
        self.requests += 1
        blob = self._bucket.get_blob(self._key(rel), retry=DEFAULT_RETRY)
        if blob is None:
            return None, None
        self.requests += 1
        try:  # Read exactly the generation whose token we return.
            data = blob.download_as_bytes(if_generation_match=blob.generation, retry=DEFAULT_RETRY)
        except (gexc.PreconditionFailed, gexc.NotFound):
            return self.read_meta(name)
        return _validate.loads(data, self._gs(rel)), blob.generation

    def write_meta(self, name: str, value: dict, expected_version: Any = None) -> None:
        rel = f"meta/{_validate.check_id(name, 'meta name')}.json"
        if expected_version is not None and not isinstance(expected_version, int):
            raise StoreError(f"bad version token {expected_version!r} for meta {name}")
        data = _validate.dumps(value, f"meta {name}")
        self._put(rel, data, generation=expected_version or 0)

    # -- blobs (compiled programs shared by the run's workers) --------------------------------

    def write_blob(self, name: str, data: bytes) -> None:
        self._put("/".join(_validate.blob_parts(name)), data, generation=0)

    def read_blob(self, name: str, max_bytes: int) -> bytes:
        rel = "/".join(_validate.blob_parts(name))
        self.requests += 1
        blob = self._bucket.get_blob(self._key(rel), retry=DEFAULT_RETRY)
        if blob is None:
            raise NotFoundError(f"{self._gs(rel)} does not exist")
        if blob.size is not None and blob.size > max_bytes:
            raise CorruptObjectError(f"corrupt object {self._gs(rel)}: larger than {max_bytes}")
        data = self._get(rel)
        if len(data) > max_bytes:
            raise CorruptObjectError(f"corrupt object {self._gs(rel)}: larger than {max_bytes}")
        return data

    def delete_blob(self, name: str) -> None:
        self._delete("/".join(_validate.blob_parts(name)))

    def list_blobs(self, prefix: str) -> list[str]:
        rel = "/".join(_validate.blob_prefix(prefix)) + "/"
        return _validate.blob_names(self._rel(blob, "") for blob in self._list(rel))


def _safe_path(root: str, rel: str, what: str) -> str:
    """Maps an object name from the store to a path under `root`, refusing traversal."""
    parts = rel.split("/")
    if len(parts) > 8 or not all(_FILE_RE.match(p) and p not in (".", "..") for p in parts):
        raise CheckpointError(f"checkpoint {what} holds a hostile file name {rel!r}")
    return os.path.join(root, *parts)
