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
    programs/<key>/<file>           blobs: compiled programs (create-only, link())
    resume/<child id>/<file>        blobs: training state of children in flight
"""

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from typing import Any

from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    CorruptObjectError,
    NotFoundError,
    StoreError,
)
from evojax_nas.store import _checkpoint, _validate
from evojax_nas.store.base import Member, Store

log = logging.getLogger(__name__)

_DIRS = ("inds", "alive", "dead", "gone", "meta", "workers", "tmp")
_META_KEEP = 8  # Old meta versions kept readable so that a slow reader still finds its version.
# A superseded meta version's file is emptied (a tombstone), not deleted, and stays this long:
# while its name is taken, a compare-and-swap delayed past many newer versions cannot recreate
# it and win with a stale value (its create fails, and it reports the conflict).
_META_TOMBSTONE_SECONDS = 86_400.0
_TMP_GRACE = 600.0  # Seconds before gc treats a tmp/ entry as left by a crashed publisher.
_CLAIM_GRACE = 60.0  # Seconds before a claimed ID without a marker is an interrupted publication.


class LocalStore(Store):
    """A population store in a local (or network-mounted) directory."""

    def __init__(self, path: str, *, create: bool = True):
        """Opens the store rooted at `path`; creates its directories unless `create` is False.

        Raises:
            NotFoundError: `create` is False and there is no directory at `path`.
        """
        self.root = os.path.abspath(path)
        self.url = self.root
        self.requests = 0
        self._names: dict[str, str] = {}  # ID -> marker name; names never change.
        self._last_deep_gc = 0.0
        if not create and not os.path.isdir(self.root):
            raise NotFoundError(f"no run at {self.root}: the directory does not exist")
        if create:  # a read-only open (status, report…) of a non-run must write nothing
            for d in _DIRS:
                if os.path.islink(self._path(d)) and d != "tmp":
                    raise StoreError(
                        f"{self._path(d)} is a symlink; a store never follows symlinks"
                    )
                os.makedirs(os.path.join(self.root, d), exist_ok=True)
            self._tmp_dir()

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
        return _validate.loads(read_regular(self.root, parts, _validate.MAX_JSON_BYTES), path)

    def _real_dir(self, *parts: str) -> bool:
        """True if `parts` is a directory inside the store, reached without any symlink."""
        path = self.root
        for part in parts:
            path = os.path.join(path, part)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return False
            except FileNotFoundError:
                return False
        return True

    def _tmp_dir(self) -> str:
        """tmp/, replaced if something else (e.g. a stale symlink) took its place."""
        tmp = self._path("tmp")
        if not self._real_dir("tmp"):
            log.warning("%s is not a directory (a symlink?); replacing it", tmp)
            try:
                os.unlink(tmp)  # a symlink or file: removes the link itself, not its target
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                pass
            os.makedirs(tmp, exist_ok=True)
        return tmp

    def _tmp_file(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir())
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
        tmp = tempfile.mkdtemp(dir=self._tmp_dir(), prefix=ind_id + ".")
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

    def read_params(self, ind_id: str, max_bytes: int | None = None) -> Any:
        ckpt = self._path("inds", _validate.check_id(ind_id), "ckpt")
        self.requests += 1
        if not self._real_dir("inds", ind_id, "ckpt"):
            if os.path.islink(ckpt) or os.path.islink(self._path("inds", ind_id)):
                raise CheckpointError(f"checkpoint {ckpt} is a symlink; refusing it")
            if self._real_dir("inds", ind_id):
                raise NotFoundError(f"checkpoint {ckpt} was garbage-collected")
            raise NotFoundError(f"individual {ind_id} does not exist in {self.url}")
        return _checkpoint.restore(ckpt, ckpt, max_bytes)

    def _states(self) -> dict[str, tuple[str, str]]:
        """ID -> (state, marker name) of every individual ever born.

        Markers only move alive -> dead -> gone, and the listings are made in that order: an
        individual moved during the scan is listed twice (its later state wins), never missed.
        """
        states: dict[str, tuple[str, str]] = {}
        for state in ("alive", "dead", "gone"):
            for name in self._listdir(state):
                try:
                    ind_id, _, _ = _validate.parse_marker(name)
                except CorruptObjectError as e:
                    log.warning("skipping %s", e)
                    continue
                states[ind_id] = (state, name)
        return states

    def individual_ids(self) -> list[str]:
        return sorted(self._states())

    def records(self) -> list[dict]:
        out = []
        for ind_id, (state, name) in sorted(self._states().items()):
            try:
                record = self.read_record(ind_id)
            except StoreError as e:
                log.warning("record of %s unreadable: %s", ind_id, e)
                record = {"fitness": _validate.parse_marker(name)[1], "error": str(e)}
            out.append(record | {"id": ind_id, "alive": state == "alive"})
        return out

    def heartbeat(self, worker_id: int, info: dict) -> None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise StoreError(f"worker_id must be a non-negative int, got {worker_id!r}")
        tmp = self._tmp_file(_validate.dumps(dict(info) | {"worker": worker_id}, "heartbeat"))
        self.requests += 1
        os.replace(tmp, self._path("workers", f"{worker_id}.json"))

    def workers(self, recent_seconds: float | None = None) -> list[dict]:
        out, now = [], time.time()
        for name in self._listdir("workers"):
            try:
                _validate.check_id(name, "file name")
                if recent_seconds is not None:
                    st = os.lstat(self._path("workers", name))
                    if now - st.st_mtime > recent_seconds:
                        continue
                out.append(_validate.check_heartbeat(self._read_json("workers", name), name))
            except (StoreError, FileNotFoundError) as e:
                log.warning("skipping heartbeat: %s", e)
        return sorted(out, key=lambda w: w["worker"])

    def _meta_versions(self, name: str) -> list[int]:
        names = self._listdir("meta", name)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read_meta(self, name: str) -> tuple[dict | None, Any]:
        _validate.check_id(name, "meta name")
        for _ in range(_META_KEEP):
            versions = self._meta_versions(name)
            if not versions:
                return None, None
            latest = f"{versions[-1]:012d}.json"
            try:
                st = os.lstat(self._path("meta", name, latest))
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    continue  # Superseded (a tombstone) since it was listed: list again.
            except FileNotFoundError:
                continue
            return self._read_json("meta", name, latest), versions[-1]
        raise CorruptObjectError(f"meta {name}: the latest version is empty")

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
        now = time.time()
        for old in versions[:-_META_KEEP]:
            self._retire_meta_version(self._path("meta", name, f"{old:012d}.json"), now)

    @staticmethod
    def _retire_meta_version(path: str, now: float) -> None:
        """Empties a superseded meta version (its name stays taken); deletes old tombstones."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        except OSError:  # a symlink or FIFO in its place: remove the entry itself
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.unlink(path)
            elif st.st_size:
                os.ftruncate(fd, 0)
            elif now - st.st_mtime > _META_TOMBSTONE_SECONDS:
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def gc(self, grace_seconds: float) -> int:
        """Collects dead checkpoints, then (at most once per grace period, and never inside
        it) interrupted publications, phantom markers and leftovers of crashed publishers.
        Nothing outside the store is ever touched: symlinks are removed, never followed."""
        now, collected = time.time(), 0
        for name in self._listdir("dead"):
            try:
                ind_id, _, _ = _validate.parse_marker(name)
                st = os.lstat(self._path("dead", name))
            except (CorruptObjectError, FileNotFoundError):
                continue
            if now - max(st.st_mtime, st.st_ctime) < grace_seconds:
                continue
            self._drop_checkpoint(ind_id)
            self.requests += 3
            try:
                os.rename(self._path("dead", name), self._path("gone", name))
                collected += 1
            except FileNotFoundError:
                pass  # Another gc got there first.
        if now - self._last_deep_gc >= max(grace_seconds, 1.0):
            self._last_deep_gc = now
            collected += self._gc_interrupted(
                now - grace_seconds, now - max(grace_seconds, _CLAIM_GRACE)
            )
        self._gc_tmp(now - max(grace_seconds, _TMP_GRACE))
        return collected

    def _drop_checkpoint(self, ind_id: str) -> None:
        """Deletes inds/<id>/ckpt atomically (a reader sees all of it or none of it)."""
        if not self._real_dir("inds", ind_id):
            if os.path.islink(self._path("inds", ind_id)):
                log.warning("gc: %s is a symlink; removing the link", self._path("inds", ind_id))
                _unlink(self._path("inds", ind_id))
            return
        trash = self._path("inds", ind_id, ".ckpt-gc")
        _remove(trash)  # Left by a gc that crashed.
        try:
            os.rename(self._path("inds", ind_id, "ckpt"), trash)
        except FileNotFoundError:
            pass
        _remove(trash)

    def _gc_interrupted(self, cutoff: float, claim_cutoff: float) -> int:
        """Collects publications interrupted between claim and marker (inds/<id>, no marker,
        claimed before `claim_cutoff`) and phantom markers (alive, but the DNA or checkpoint is
        gone) born before `cutoff`."""
        states, collected = self._states(), 0
        for ind_id in self._listdir("inds"):
            path = self._path("inds", ind_id)
            try:
                st = os.lstat(path)
                if ind_id in states or max(st.st_mtime, st.st_ctime) >= claim_cutoff:
                    continue
            except FileNotFoundError:
                continue
            log.warning("gc: removing interrupted publication %s", path)
            _remove(path)
            collected += 1
        for ind_id, (state, name) in states.items():
            _, _, birth = _validate.parse_marker(name)
            whole = self._real_dir("inds", ind_id, "ckpt") and os.path.isfile(
                self._path("inds", ind_id, "dna.json")
            )
            if state == "alive" and birth / 1e9 < cutoff and not whole:
                collected += self._kill_phantom(ind_id)
        return collected

    def _gc_tmp(self, cutoff: float) -> None:
        """Removes leftovers of crashed publishers older than `cutoff`."""
        if not self._real_dir("tmp"):
            self._tmp_dir()
            return
        for name in self._listdir("tmp"):
            path = self._path("tmp", name)
            try:
                if os.lstat(path).st_mtime < cutoff:
                    _remove(path)
            except FileNotFoundError:
                pass

    # -- blobs (compiled programs shared by the run's workers) --------------------------------

    def write_blob(self, name: str, data: bytes) -> None:
        parts = _validate.blob_parts(name)
        for attempt in range(2):  # a delete_blob may remove an emptied resume/<key>/ meanwhile
            os.makedirs(self._path(*parts[:-1]), exist_ok=True)
            if not self._real_dir(*parts[:-1]):
                raise CorruptObjectError(f"{self._path(*parts[:-1])} is not a plain directory")
            try:
                created = self._create_file(self._path(*parts), data)
                break
            except FileNotFoundError:
                if attempt:
                    raise
        if not created:
            raise ConcurrencyError(f"blob {name} already exists in {self.url}")

    def read_blob(self, name: str, max_bytes: int) -> bytes:
        self.requests += 1
        return read_regular(self.root, tuple(_validate.blob_parts(name)), max_bytes)

    def delete_blob(self, name: str) -> None:
        parts = _validate.blob_parts(name)
        self.requests += 1
        if self._real_dir(*parts[:-1]):
            _unlink(self._path(*parts))
            if parts[0] == _validate.RESUME_DIR:  # a finished child leaves no empty folder
                try:
                    os.rmdir(self._path(*parts[:-1]))
                except OSError:
                    pass  # not empty

    def list_blobs(self, prefix: str) -> list[str]:
        parts = _validate.blob_prefix(prefix)
        keys = [parts[1]] if len(parts) == 2 else sorted(self._listdir(parts[0]))
        return _validate.blob_names(
            f"{parts[0]}/{key}/{file}"
            for key in keys
            # never follows a symlink out of the store
            if _validate.ID_RE.match(key) and self._real_dir(parts[0], key)
            for file in self._listdir(parts[0], key)
        )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove(path: str) -> None:
    """Removes a file, symlink (not its target) or directory tree (never following links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks symlinks inside, never follows
    else:
        _unlink(path)


def read_regular(root: str, parts: tuple[str, ...], limit: int) -> bytes:
    """Reads the regular file `root/parts...` without following any symlink under `root`.

    Each directory is opened relative to the previous one with O_NOFOLLOW; the file itself is
    opened non-blocking (a FIFO must not hang us), then checked to be a regular file of at most
    `limit` bytes before anything is read.

    Raises:
        NotFoundError: it does not exist.
        CorruptObjectError: a symlink, not a regular file, or too big.
    """
    path = os.path.join(root, *parts)
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
        fds.append(os.open(parts[-1], _FILE_FLAGS, dir_fd=fds[-1]))
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            raise CorruptObjectError(f"corrupt object {path}: not a regular file")
        if st.st_size > limit:
            raise CorruptObjectError(f"{path} is {st.st_size} bytes; the limit is {limit}")
        with os.fdopen(os.dup(fds[-1]), "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            raise CorruptObjectError(f"corrupt object {path}: {e.strerror} (a symlink?)") from None
        raise
    finally:
        for fd in fds:
            os.close(fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
