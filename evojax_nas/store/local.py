"""Local-directory backend: POSIX rename / link / O_EXCL, as on the paper's shared file system.

Layout under the root directory:

    config.json                     created once with link() (create-only)
    inds/<id>/dna.json, record.json, ckpt/   written in tmp/, then renamed here (claims the ID)
    alive/<id>@<fitness>@<birth>    empty marker, created with O_EXCL after inds/<id> is complete
    dead/<same name>                kill = rename alive/ -> dead/ (only one rename can succeed)
    gone/<same name>                gc = delete the checkpoint, then rename dead/ -> gone/
    meta/<name>/<version>.json      versions created with link(); compare-and-swap by version
    workers/<n>.json                heartbeats, replaced atomically
    tmp/                            work in progress; stale entries are removed by gc
"""

import errno
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from evojax_nas.errors import ConcurrencyError, CorruptObjectError, NotFoundError, StoreError
from evojax_nas.store import _checkpoint, _validate
from evojax_nas.store.base import Member, Store

log = logging.getLogger(__name__)

_DIRS = ("inds", "alive", "dead", "gone", "meta", "workers", "tmp")
_META_KEEP = 8  # Old meta versions kept so that a slow compare-and-swap still sees its loss.
_TMP_GRACE = 600.0  # Seconds before gc treats a tmp/ entry as left by a crashed publisher.


class LocalStore(Store):
    """A population store in a local (or network-mounted) directory."""

    def __init__(self, path: str, *, create: bool = True):
        """Opens the store rooted at `path`, creating its directories unless `create` is False.

        Raises:
            NotFoundError: `create` is False and there is no directory at `path`.
        """
        self.root = os.path.abspath(path)
        self.url = self.root
        self.requests = 0
        self._names: dict[str, str] = {}  # ID -> marker name; names never change.
        if not create and not os.path.isdir(self.root):
            raise NotFoundError(f"no run at {self.root}: the directory does not exist")
        for d in _DIRS:
            os.makedirs(os.path.join(self.root, d), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _listdir(self, *parts: str) -> list[str]:
        self.requests += 1
        try:
            return os.listdir(self._path(*parts))
        except FileNotFoundError:
            return []

    def _read_json(self, *parts: str) -> dict:
        path = self._path(*parts)
        self.requests += 1
        try:
            with open(path, "rb") as f:
                data = f.read(_validate.MAX_JSON_BYTES + 1)
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise CorruptObjectError(f"corrupt object {path}: a directory") from None
        return _validate.loads(data, path)

    def _tmp_file(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self._path("tmp"))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return tmp

    def _create_file(self, path: str, data: bytes) -> bool:
        """Creates `path` with `data` atomically; False if it already exists."""
        tmp = self._tmp_file(data)
        self.requests += 1
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def write_config(self, config: dict) -> bool:
        return self._create_file(self._path("config.json"), _validate.dumps(config, "config"))

    def read_config(self) -> dict:
        try:
            return self._read_json("config.json")
        except NotFoundError:
            raise NotFoundError(f"no run at {self.url}: config.json is missing") from None

    def publish(self, ind_id: str, dna: dict, record: dict, fitness: float, params: Any) -> None:
        fitness, dna_bytes, record_bytes = _validate.publication(ind_id, dna, record, fitness)
        final = self._path("inds", ind_id)
        if os.path.lexists(final):
            raise ConcurrencyError(f"individual {ind_id} already exists in {self.url}")
        tmp = tempfile.mkdtemp(dir=self._path("tmp"), prefix=ind_id + ".")
        try:
            for name, data in (("dna.json", dna_bytes), ("record.json", record_bytes)):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            _checkpoint.save(params, os.path.join(tmp, "ckpt"))
            self.requests += 3
            self._claim(tmp, final, ind_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        name = _validate.marker_name(ind_id, fitness, time.time_ns())
        self.requests += 1
        os.close(os.open(self._path("alive", name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        self._names[ind_id] = name

    def _claim(self, tmp: str, final: str, ind_id: str) -> None:
        """Renames the finished `tmp` directory to `final`; fails if `final` exists."""
        self.requests += 1
        try:
            os.rename(tmp, final)  # Fails on an existing non-empty directory: create-only.
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ConcurrencyError(
                    f"individual {ind_id} already exists in {self.url}"
                ) from None
            raise

    def population(self) -> list[Member]:
        members = []
        for name in self._listdir("alive"):
            try:
                ind_id, fitness, birth = _validate.parse_marker(name)
            except CorruptObjectError as e:
                log.warning("skipping %s", e)
                continue
            self._names[ind_id] = name
            members.append(Member(ind_id, fitness, birth))
        return sorted(members, key=lambda m: m.id)

    def _find(self, ind_id: str) -> str | None:
        """Returns the marker name of `ind_id` (one listing on a cache miss), or None."""
        if ind_id not in self._names:
            for state in ("alive", "dead", "gone"):
                for name in self._listdir(state):
                    if name.startswith(ind_id + _validate.SEP):
                        self._names[ind_id] = name
                        return name
        return self._names.get(ind_id)

    def kill(self, ind_id: str) -> None:
        _validate.check_id(ind_id)
        name = self._find(ind_id)
        if name is None:
            raise NotFoundError(f"individual {ind_id} does not exist in {self.url}")
        self.requests += 1
        try:
            os.rename(self._path("alive", name), self._path("dead", name))
        except FileNotFoundError:
            # gc moves dead/ -> gone/, so look in that order to never miss the marker.
            if os.path.lexists(self._path("dead", name)) or os.path.lexists(
                self._path("gone", name)
            ):
                raise ConcurrencyError(f"individual {ind_id} was already killed") from None
            raise NotFoundError(f"individual {ind_id} does not exist in {self.url}") from None
        try:  # Stamp the kill time for gc's grace period (rename also updates ctime on Linux).
            os.utime(self._path("dead", name))
        except FileNotFoundError:
            pass

    def read_dna(self, ind_id: str) -> dict:
        return self._read_json("inds", _validate.check_id(ind_id), "dna.json")

    def read_record(self, ind_id: str) -> dict:
        record = self._read_json("inds", _validate.check_id(ind_id), "record.json")
        return _validate.check_record(record, ind_id, self._path("inds", ind_id, "record.json"))

    def read_params(self, ind_id: str) -> Any:
        ckpt = self._path("inds", _validate.check_id(ind_id), "ckpt")
        self.requests += 1
        if not os.path.isdir(ckpt):
            if os.path.isdir(self._path("inds", ind_id)):
                raise NotFoundError(f"checkpoint {ckpt} was garbage-collected")
            raise NotFoundError(f"individual {ind_id} does not exist in {self.url}")
        return _checkpoint.restore(ckpt, ckpt)

    def records(self) -> list[dict]:
        out = []
        for state in ("alive", "dead", "gone"):
            for name in self._listdir(state):
                try:
                    ind_id, fitness, _ = _validate.parse_marker(name)
                except CorruptObjectError as e:
                    log.warning("skipping %s", e)
                    continue
                try:
                    record = self.read_record(ind_id)
                except StoreError as e:
                    log.warning("record of %s unreadable: %s", ind_id, e)
                    record = {"fitness": fitness, "error": str(e)}
                out.append(record | {"id": ind_id, "alive": state == "alive"})
        return sorted(out, key=lambda r: r["id"])

    def heartbeat(self, worker_id: int, info: dict) -> None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise StoreError(f"worker_id must be a non-negative int, got {worker_id!r}")
        tmp = self._tmp_file(_validate.dumps(dict(info) | {"worker": worker_id}, "heartbeat"))
        self.requests += 1
        os.replace(tmp, self._path("workers", f"{worker_id}.json"))

    def workers(self) -> list[dict]:
        out = []
        for name in self._listdir("workers"):
            try:
                out.append(self._read_json("workers", _validate.check_id(name, "file name")))
            except StoreError as e:
                log.warning("skipping heartbeat: %s", e)
        return sorted(out, key=lambda w: str(w.get("worker")))

    def _meta_versions(self, name: str) -> list[int]:
        names = self._listdir("meta", name)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read_meta(self, name: str) -> tuple[dict | None, Any]:
        _validate.check_id(name, "meta name")
        versions = self._meta_versions(name)
        if not versions:
            return None, None
        return self._read_json("meta", name, f"{versions[-1]:012d}.json"), versions[-1]

    def write_meta(self, name: str, value: dict, expected_version: Any = None) -> None:
        _validate.check_id(name, "meta name")
        data = _validate.dumps(value, f"meta {name}")
        if expected_version is not None and not isinstance(expected_version, int):
            raise StoreError(f"bad version token {expected_version!r} for meta {name}")
        os.makedirs(self._path("meta", name), exist_ok=True)
        versions = self._meta_versions(name)
        current = versions[-1] if versions else None
        new = (expected_version or 0) + 1
        if current != expected_version or not self._create_file(
            self._path("meta", name, f"{new:012d}.json"), data
        ):
            raise ConcurrencyError(f"meta {name} changed (expected version {expected_version})")
        for old in versions[:-_META_KEEP]:
            try:
                os.unlink(self._path("meta", name, f"{old:012d}.json"))
            except FileNotFoundError:
                pass

    def gc(self, grace_seconds: float) -> int:
        now, collected = time.time(), 0
        for name in self._listdir("dead"):
            try:
                ind_id, _, _ = _validate.parse_marker(name)
                st = os.stat(self._path("dead", name))
            except (CorruptObjectError, FileNotFoundError):
                continue
            if now - max(st.st_mtime, st.st_ctime) < grace_seconds:
                continue
            trash = self._path("inds", ind_id, ".ckpt-gc")
            shutil.rmtree(trash, ignore_errors=True)  # Left by a gc that crashed.
            try:  # Atomic: a reader sees the whole checkpoint or none of it.
                os.rename(self._path("inds", ind_id, "ckpt"), trash)
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
            self.requests += 3
            try:
                os.rename(self._path("dead", name), self._path("gone", name))
                collected += 1
            except FileNotFoundError:
                pass  # Another gc got there first.
        self._gc_tmp(now - max(grace_seconds, _TMP_GRACE))
        return collected

    def _gc_tmp(self, cutoff: float) -> None:
        """Removes leftovers of crashed publishers older than `cutoff`."""
        for name in self._listdir("tmp"):
            path = self._path("tmp", name)
            try:
                if os.lstat(path).st_mtime < cutoff:
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            except FileNotFoundError:
                pass
