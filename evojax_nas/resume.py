"""Resume mid-child: a long child's training state in the store, adopted after a preemption.

A child still training `resume_interval_seconds` after it started saves its training state
(params, batch statistics, optimizer state, the steps done) at a chunk boundary into the store,
and again every as many seconds. A worker that finds the saved child of a dead worker (one
whose heartbeat `lifecycle.is_live` no longer counts, or that its supervisor marked dead)
claims it, trains on from the saved step and publishes it as its maker would have: the same
ID, parent, event key and record apart from timings (and `resumed`, saying by whom and from
which step). Training depends only on the step and the child's key (`train.run_training`), so
the result is bit for bit that of the uninterrupted child.

The blobs of one child, all create-only (a blob is visible whole or not at all):

    resume/<id>/owner-<k>.json      who trains it: k=0 its maker; an adopter creates k+1, so of
                                    several adopters exactly one wins; written first
    resume/<id>/child.json          what finishing it needs: DNA, key, parent, record fields
    resume/<id>/initial.npz         its untrained variables (what a diverged child publishes)
    resume/<id>/state-<step>-<sha>.npz   the training state after <step> steps; the digest of
                                    its bytes is in its name; older ones are deleted

The folder is deleted once the child is published or dropped. Damaged contents are reported in
one line and the child is dropped; they never stop a worker. `collect` (run with gc) removes
folders of children published meanwhile, and those of dead owners that never saved a state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas.errors import ConcurrencyError, CorruptObjectError, NotFoundError, StoreError
from evojax_nas.lifecycle import LIVE_SECONDS, is_live
from evojax_nas.model import variable_shapes
from evojax_nas.steps import TrainConfig, TrainState, make_optimizer
from evojax_nas.store import Store

log = logging.getLogger(__name__)

FOLDER = "resume"
SCAN_SECONDS = 30.0  # a worker looks for orphaned children at start and then this often
_OWNER_RE = re.compile(r"^owner-(\d{6})\.json$")
_STATE_RE = re.compile(r"^state-(\d{9})-([0-9a-f]{16})\.npz$")
_SLACK = 1 << 20  # bytes of npz headers beyond the arrays themselves


def _name(child_id: str, file: str) -> str:
    return f"{FOLDER}/{child_id}/{file}"


@dataclasses.dataclass(frozen=True)
class Child:
    """What finishing an in-flight child needs besides its training state (`child.json`)."""

    id: str
    worker: int  # the worker whose event made it (its ID and key derive from it)
    event: int
    key: tuple[int, ...]  # the event key (`keys.key_to_json`)
    action: str  # "initial" or "reproduce"
    parent: str | None
    kill: str | None  # killed by its event (already done)
    dna: dict
    mutation: dict
    replaces_parent: bool = False
    timings: dict = dataclasses.field(default_factory=dict)  # seconds of its event's first half

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"key": list(self.key)}

    @classmethod
    def from_json(cls, value: Any, what: str) -> Child:
        """Raises CorruptObjectError naming the first field of the wrong type."""
        types = {
            "id": str,
            "worker": int,
            "event": int,
            "key": list,
            "action": str,
            "parent": (str, type(None)),
            "kill": (str, type(None)),
            "dna": dict,
            "mutation": dict,
            "replaces_parent": bool,
            "timings": dict,
        }
        if not isinstance(value, dict):
            raise CorruptObjectError(f"corrupt object {what}: not a JSON object")
        for field, t in types.items():
            if not isinstance(value.get(field), t) or (t is int and type(value[field]) is bool):
                raise CorruptObjectError(f"corrupt object {what}: bad field {field!r}")
        if not all(type(x) is int for x in value["key"]):
            raise CorruptObjectError(f"corrupt object {what}: key must be a list of integers")
        return cls(**{f: value[f] for f in types} | {"key": tuple(value["key"])})


# -- arrays <-> bytes (npz, no pickle, bounded) -------------------------------------------------


def _to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _from_npz(data: bytes, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an npz; CorruptObjectError if it is damaged or expands beyond max_bytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > max_bytes:
                raise CorruptObjectError(f"corrupt object {what}: larger than {max_bytes} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CorruptObjectError(f"corrupt object {what}: {exc}") from None


def _flat_variables(variables: Any) -> dict[str, np.ndarray]:
    return {
        f"{coll}/{module}/{leaf}": np.asarray(value)
        for coll in ("params", "batch_stats")
        for module, leaves in variables.get(coll, {}).items()
        for leaf, value in leaves.items()
    }


def _variables_from(arrays: dict[str, np.ndarray], dna: Any, what: str) -> dict:
    """Nested variables from flat arrays, which must be exactly the float32 shapes of `dna`."""
    want = {f"{c}/{m}/{leaf}": tuple(s) for (c, m, leaf), s in variable_shapes(dna).items()}
    got = {k: tuple(a.shape) for k, a in arrays.items() if a.dtype == np.float32}
    if got != want or len(arrays) != len(want):
        raise CorruptObjectError(f"corrupt object {what}: its arrays do not match the child's DNA")
    out: dict = {"params": {}, "batch_stats": {}}
    for name, a in arrays.items():
        coll, module, leaf = name.split("/")
        out[coll].setdefault(module, {})[leaf] = a
    return out


def _state_template(variables: Any, config: TrainConfig) -> TrainState:
    """The structure, shapes and dtypes of a training state of these variables."""
    params = variables["params"]
    opt = jax.eval_shape(make_optimizer(config).init, params)
    return TrainState(params, variables["batch_stats"], opt, np.asarray(False))


def _state_bytes(state: TrainState) -> bytes:
    leaves = jax.device_get(jax.tree_util.tree_leaves(state))
    return _to_npz({f"a{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def _state_from(arrays: dict[str, np.ndarray], template: TrainState, what: str) -> TrainState:
    """The training state held by `arrays`; CorruptObjectError unless it has exactly the
    template's leaves (shapes, dtypes) and is not diverged."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    got = [arrays.get(f"a{i:05d}") for i in range(len(leaves))]
    if len(arrays) != len(leaves) or any(
        a is None or a.shape != tuple(t.shape) or a.dtype != t.dtype
        for a, t in zip(got, leaves, strict=True)
    ):
        raise CorruptObjectError(f"corrupt object {what}: not a training state of the child")
    state = jax.tree_util.tree_unflatten(treedef, got)
    if bool(state.bad):
        raise CorruptObjectError(f"corrupt object {what}: a diverged state")
    return state


def variables_max_bytes(dna: Any) -> int:
    """What a child's float32 variables may hold, from its DNA alone."""
    return 4 * sum(int(np.prod(s)) for s in variable_shapes(dna).values()) + _SLACK


# -- the folder of one child --------------------------------------------------------------------


def _files(store: Store, child_id: str) -> list[str]:
    return [n.rsplit("/", 1)[1] for n in store.list_blobs(f"{FOLDER}/{child_id}")]


def _owners(files: Sequence[str]) -> list[int]:
    return sorted(int(m.group(1)) for f in files if (m := _OWNER_RE.match(f)))


def _states(files: Sequence[str]) -> list[tuple[int, str, str]]:
    """(step, digest, file) of each saved state, newest first."""
    found = [(int(m.group(1)), m.group(2), f) for f in files if (m := _STATE_RE.match(f))]
    return sorted(found, reverse=True)


def _owner_name(k: int) -> str:
    return f"owner-{k:06d}.json"


def _write_json(store: Store, name: str, value: dict) -> None:
    store.write_blob(name, json.dumps(value).encode())


def _read_json(store: Store, name: str) -> Any:
    try:
        return json.loads(store.read_blob(name, 1 << 20))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptObjectError(f"corrupt object {store.url}/{name}: {exc}") from None


def discard(store: Store, child_id: str) -> None:
    """Deletes every blob of a child's folder (its state is not needed any more)."""
    for file in _files(store, child_id):
        store.delete_blob(_name(child_id, file))


class Checkpointer:
    """Saves an in-flight child's training state every `interval` seconds (a `train.OnChunk`).

    Its maker creates the folder at the first save (`owner_index` 0); an adopter passes the
    owner index it claimed. A save that finds a newer owner raises ConcurrencyError: the
    child was adopted (this worker was thought dead), and this worker must drop it.
    A save that fails for another storage reason is logged and training goes on.
    """

    def __init__(
        self,
        store: Store,
        child: Child,
        variables: Any,
        interval: float,
        *,
        owner: int,
        owner_index: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.child, self.variables = store, child, variables
        self.interval, self.owner, self.owner_index, self.clock = (
            interval,
            owner,
            owner_index,
            clock,
        )
        self.started = owner_index > 0  # an adopter's folder exists
        self.lost = False
        self.saves = 0
        self._last = clock()

    def __call__(self, step: int, state: TrainState) -> None:
        if self.clock() - self._last < self.interval:
            return
        try:
            self.save(step, state)
        except ConcurrencyError:
            raise
        except NotImplementedError:  # a store without blobs: train on without saving
            self.interval = math.inf
        except (StoreError, OSError) as exc:
            log.warning(
                "worker %d: could not save %s at step %d: %s", self.owner, self.child.id, step, exc
            )
        self._last = self.clock()

    def _check_owner(self) -> list[str]:
        files = _files(self.store, self.child.id)
        owners = _owners(files)
        if not owners or owners[-1] != self.owner_index:
            self.lost = True
            raise ConcurrencyError(f"{self.child.id} was adopted by another worker")
        return files

    def save(self, step: int, state: TrainState) -> None:
        """Writes the state after `step` steps (and, the first time, the child's folder)."""
        cid = self.child.id
        if not self.started:
            try:
                _write_json(self.store, _name(cid, _owner_name(0)), self._owner_info())
            except ConcurrencyError:
                self.lost = True
                raise
            self.started = True
        files = self._check_owner()
        for file in ("child.json", "initial.npz"):  # once (again, if a first try failed)
            if file not in files:
                data = (
                    json.dumps(self.child.to_json()).encode()
                    if file == "child.json"
                    else _to_npz(_flat_variables(self.variables))
                )
                self.store.write_blob(_name(cid, file), data)
        data = _state_bytes(state)
        digest = hashlib.sha256(data).hexdigest()[:16]
        try:
            self.store.write_blob(_name(cid, f"state-{step:09d}-{digest}.npz"), data)
        except ConcurrencyError:
            pass  # this very state was saved already (same step, same bytes)
        self.saves += 1
        for old_step, _, file in _states(files):
            if old_step < step:
                self.store.delete_blob(_name(cid, file))

    def _owner_info(self) -> dict:
        return {"worker": self.owner, "time": time.time()}

    def discard(self) -> None:
        """Deletes the child's folder unless another worker owns it now; never raises."""
        if not self.started or self.lost:
            return
        try:
            owners = _owners(_files(self.store, self.child.id))
            if owners and owners[-1] == self.owner_index:
                discard(self.store, self.child.id)
        except (StoreError, OSError) as exc:
            log.warning("could not delete the saved state of %s: %s", self.child.id, exc)


@dataclasses.dataclass(frozen=True)
class Adopted:
    """An orphaned child this worker claimed: what `Worker` needs to finish it."""

    child: Child
    variables: Any  # its untrained variables
    step: int  # steps done
    state: TrainState  # host arrays
    owner_index: int  # the owner index this worker claimed


def live_workers(store: Store, now: float | None = None) -> set[int]:
    """The IDs of the workers whose heartbeat says they are running."""
    now = time.time() if now is None else now
    return {w["worker"] for w in store.workers(LIVE_SECONDS) if is_live(w, now)}


def _published(store: Store, child_id: str) -> bool:
    """Whether the child's ID is taken (published, or its record is damaged: either way it
    cannot be published again)."""
    try:
        store.read_record(child_id)
        return True
    except NotFoundError:
        return False
    except StoreError:
        return True


def _orphans(store: Store, worker_id: int, live: Callable[[], set[int]]):
    """(child ID, files, newest owner index) of each child whose owner is gone."""
    by_child: dict[str, list[str]] = {}
    for name in store.list_blobs(FOLDER):
        _, cid, file = name.split("/")
        by_child.setdefault(cid, []).append(file)
    alive: set[int] | None = None
    for cid, files in sorted(by_child.items()):
        owners = _owners(files)
        if not owners:
            continue  # being created, or being deleted
        try:
            info = _read_json(store, _name(cid, _owner_name(owners[-1])))
            owner = info.get("worker") if isinstance(info, dict) else None
        except NotFoundError:
            continue  # deleted meanwhile
        except CorruptObjectError as exc:
            log.warning("ignoring a damaged owner file: %s", exc)
            owner = None
        if owner == worker_id:
            continue
        if alive is None:
            alive = live()
        if owner in alive:
            continue
        yield cid, files, owners[-1]


def adopt(
    store: Store,
    worker_id: int,
    config: TrainConfig,
    *,
    live: Callable[[], set[int]] | None = None,
) -> Adopted | None:
    """Claims one in-flight child of a dead worker and loads it; None if there is none.

    A damaged child (its files unreadable, or not those of its DNA) is reported in one line and
    deleted; a child that was published meanwhile is deleted. Store failures propagate.
    """
    live = live or (lambda: live_workers(store))
    for cid, files, k in _orphans(store, worker_id, live):
        if not _states(files):
            continue  # its maker died before the first state landed: `collect` removes it
        if _published(store, cid):
            discard(store, cid)
            continue
        try:
            claim = {"worker": worker_id, "time": time.time()}
            _write_json(store, _name(cid, _owner_name(k + 1)), claim)
        except ConcurrencyError:
            continue  # another worker adopted it first
        try:
            return _load(store, cid, files, config, k + 1)
        except (CorruptObjectError, NotFoundError) as exc:
            log.warning("dropping in-flight child %s: its saved state is unusable: %s", cid, exc)
            discard(store, cid)
        except (StoreError, OSError, KeyboardInterrupt):  # release the claim for a later try
            with contextlib.suppress(Exception):
                store.delete_blob(_name(cid, _owner_name(k + 1)))
            raise
        except Exception as exc:  # anything else about its contents: drop it, never crash
            log.warning("dropping in-flight child %s: cannot load it: %r", cid, exc)
            discard(store, cid)
    return None


def _load(store: Store, cid: str, files: list[str], config: TrainConfig, index: int) -> Adopted:
    child = Child.from_json(_read_json(store, _name(cid, "child.json")), f"{cid}/child.json")
    if child.id != cid:
        raise CorruptObjectError(f"corrupt object {cid}/child.json: it names {child.id}")
    try:
        dna = dna_lib.from_dict(child.dna)
    except Exception as exc:
        raise CorruptObjectError(f"corrupt object {cid}/child.json: bad DNA: {exc}") from None
    limit = variables_max_bytes(dna)
    what = f"{store.url}/{FOLDER}/{cid}"
    raw = store.read_blob(_name(cid, "initial.npz"), limit)
    variables = _variables_from(_from_npz(raw, f"{what}/initial.npz", limit), dna, what)
    template = _state_template(variables, config)
    errors = []
    for step, digest, file in _states(files):  # the newest usable state
        try:
            data = store.read_blob(_name(cid, file), 3 * limit)
            if hashlib.sha256(data).hexdigest()[:16] != digest:
                raise CorruptObjectError(f"corrupt object {what}/{file}: wrong digest")
            state = _state_from(_from_npz(data, f"{what}/{file}", 3 * limit), template, file)
            return Adopted(child, variables, step, state, index)
        except (CorruptObjectError, NotFoundError) as exc:
            errors.append(str(exc))
    raise CorruptObjectError("; ".join(errors) or f"{what} holds no state")


def collect(store: Store, *, live: Callable[[], set[int]] | None = None) -> int:
    """Deletes the folders of children published meanwhile (their publisher died before it
    deleted them) and of dead owners that never saved a state. Returns how many."""
    live = live or (lambda: live_workers(store))
    removed = 0
    try:
        for cid, files, _ in _orphans(store, -1, live):
            if not _states(files) or _published(store, cid):
                discard(store, cid)
                removed += 1
    except (StoreError, OSError) as exc:
        log.warning("collecting saved states of finished children failed: %s", exc)
    return removed
