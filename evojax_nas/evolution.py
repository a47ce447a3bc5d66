"""The asynchronous worker loop of the paper (§3.1) with a population set-point.

Each step a worker lists the population once and picks two individuals at random; the better
reproduces (its DNA and weights are loaded, mutated, trained, evaluated on validation, and the
child is published) and — at or above the set-point — the worse is killed first, in the same
event, as in the paper's §3.1. Workers share nothing but the store; a lost race (the individual
is already dead, a create-only write lost) abandons the step.
Every random choice comes from `event_key(seed, worker, event)`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas import resume
from evojax_nas.config import EvolutionConfig
from evojax_nas.devices import device_info
from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    CorruptObjectError,
    DNAError,
    NotFoundError,
    PublishingError,
    StoreError,
)
from evojax_nas.keys import (  # noqa: F401
    INIT,
    MUTATE,
    SELECT,
    TRAIN,
    event_key,
    for_purpose,
    key_from_json,
    key_to_json,
)
from evojax_nas.model import flatten, variable_shapes
from evojax_nas.mutations import MutationError
from evojax_nas.programs import ProgramCache, SharedPrograms, code_version
from evojax_nas.recipe import INITIAL_MUTATION, make_child, make_initial, plan_child
from evojax_nas.state import (  # noqa: F401
    CONTROL,
    MAX_MUTATIONS,
    SEEDED,
    Control,
    Record,
    child_id,
    initial_id,
)
from evojax_nas.store import Member, Store
from evojax_nas.train import (
    DeviceData,
    OnChunk,
    TrainConfig,
    TrainResult,
    TrainState,
    train_and_evaluate,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one event does: at the set-point kill `kill`, then reproduce `parent` (paper §3.1).

    Below the set-point `kill` is None: the event only reproduces, so the population grows back.
    """

    action: str  # "initial" or "reproduce"
    kill: str | None = None  # killed first, at or above the set-point
    parent: str | None = None  # reproduced
    pair: tuple[str, ...] = ()

    @property
    def target(self) -> str | None:
        """The individual this event acts on first: the one it kills, else the parent."""
        return self.kill if self.kill is not None else self.parent


def _uniforms(key: jax.Array, n: int) -> np.ndarray:
    return np.asarray(jax.random.uniform(for_purpose(key, SELECT), (n,)))


def _pick_distinct(u: Sequence[float], n: int, k: int) -> list[int]:
    """k distinct indices out of n from k uniforms (sampling without replacement)."""
    pool = list(range(n))
    return [pool.pop(min(int(x * len(pool)), len(pool) - 1)) for x in u[:k]]


def decide(
    members: Sequence[Member], key: jax.Array, cfg: EvolutionConfig, seeded: bool = True
) -> Decision:
    """The selection rule: a pure function of the listing, the event key and the config.

    Until the population first reaches its set-point (`seeded` False), workers create initial
    individuals: the paper starts from a full population of them. Later, too few individuals
    to pick a pair also gives a fresh initial one.

    Otherwise every event reproduces, and at or above the set-point it first kills, choosing
    both from one draw (paper §3.1: "the worst of the pair is immediately removed ... the best
    of the pair is selected to be a parent"): tournament kills the worse of a random pair and
    breeds the better; random (the paper's control) picks which of the pair dies by a coin;
    aging kills the oldest of the population and breeds the best of a random sample. Below the
    set-point nothing is killed, so a population that lost members grows back.
    """
    members = sorted(members, key=lambda m: m.id)  # listing order must not matter
    n = len(members)
    if n < 2 or (not seeded and n < cfg.population):
        return Decision("initial")
    sample = max(2, min(cfg.aging_sample, n)) if cfg.selection == "aging" else 2
    u = _uniforms(key, sample + 1)
    chosen = [members[i] for i in _pick_distinct(u, n, sample)]
    ids = tuple(m.id for m in chosen)
    full = n >= cfg.population
    if cfg.selection == "tournament":  # §3.1: the worse of the pair dies, the better reproduces
        a, b = chosen
        better, worse = (a, b) if a.fitness >= b.fitness else (b, a)
        victim, parent = worse.id, better.id
    elif cfg.selection == "random":  # the paper's random-search control: fitness is ignored
        i = int(u[-1] * 2) % 2
        victim, parent = chosen[i].id, chosen[1 - i].id
    else:  # aging (regularized evolution): the oldest dies; the best of a sample reproduces
        victim = min(members, key=lambda m: (m.birth, m.id)).id
        parent = max(chosen, key=lambda m: (m.fitness, m.id)).id
    return Decision("reproduce", victim if full else None, parent, ids)


Evaluator = Callable[[dna_lib.DNA, Any, jax.Array], TrainResult]

# What an individual can be wrong with: it is killed, the worker goes on.
BAD_INDIVIDUAL = (CorruptObjectError, CheckpointError, DNAError, MutationError)
# Publications in a row that failed for a reason other than storage (`StoreError`, `OSError`):
# then the fault is this installation's, not one child's, and the worker stops
# (`PublishingError`) instead of training children that are all lost.
PUBLISH_FAILURES_IN_A_ROW = 3
MAX_VARIABLE_BYTES = 1 << 31  # 2 GiB of float32 variables: far beyond the paper's largest model


def variable_bytes(dna: dna_lib.DNA) -> int:
    """The bytes of an individual's float32 variables, from its DNA alone (nothing allocated)."""
    return 4 * sum(math.prod(shape) for shape in variable_shapes(dna).values())


def load_parent(store: Store, ind_id: str, input_channels: int, num_classes: int):
    """Reads an individual's DNA and weights, refusing any that do not fit the run.

    Raises:
        DNAError: its DNA is malformed, does not fit the data, or is too big to train.
        CheckpointError: its weights are too big, or differ in names, shapes or dtypes from
            what its DNA implies.
    """
    dna = dna_lib.from_dict(store.read_dna(ind_id))
    if (dna.input_channels, dna.num_classes) != (input_channels, num_classes):
        raise DNAError(
            f"{ind_id} is for {dna.input_channels} input channels and {dna.num_classes} classes;"
            f" the data has {input_channels} and {num_classes}"
        )
    size = variable_bytes(dna)
    if size > MAX_VARIABLE_BYTES:
        raise DNAError(f"{ind_id} needs {size:.3e} bytes of weights (limit {MAX_VARIABLE_BYTES})")
    params = store.read_params(ind_id, max_bytes=size)
    if params is not None:
        check_variables(dna, params, ind_id)
    return dna, params


KNOWN_MAX_BYTES = 256 << 20  # weights a worker keeps of individuals it published or loaded
KNOWN_MAX_ITEMS = 4096  # and how many (individuals without weights count too)


class KnownIndividuals:
    """The DNA and weights of individuals a worker published or loaded, least recently used out.

    An individual never changes once published, so a parent found here is not read from the
    store again: an orbax restore costs 6-13 ms even for the default job's small nets, 2-3 % of
    its workers' time, and on GCS a download. What `get` returns is a copy: the caller may hand
    it to a training step that donates its buffers. Bounded by the bytes of the weights held
    and by the number of individuals.
    """

    def __init__(self, max_bytes: int = KNOWN_MAX_BYTES, max_items: int = KNOWN_MAX_ITEMS):
        self.max_bytes, self.max_items = max_bytes, max_items
        self.hits = 0
        self._items: collections.OrderedDict[str, tuple[dna_lib.DNA, Any, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ind_id: str) -> tuple[dna_lib.DNA, Any] | None:
        found = self._items.get(ind_id)
        if found is None:
            return None
        self._items.move_to_end(ind_id)
        self.hits += 1
        return found[0], _copy(found[1])

    def discard(self, ind_id: str) -> None:
        found = self._items.pop(ind_id, None)
        if found is not None:
            self._bytes -= found[2]

    def put(self, ind_id: str, dna: dna_lib.DNA, params: Any) -> None:
        size = variable_bytes(dna) if params is not None else 0
        if size > self.max_bytes or ind_id in self._items:
            return
        self._items[ind_id] = (dna, _copy(params), size)
        self._bytes += size
        while self._bytes > self.max_bytes or len(self._items) > self.max_items:
            self._bytes -= self._items.popitem(last=False)[1][2]


def _copy(params: Any) -> Any:
    return None if params is None else jax.tree_util.tree_map(np.array, params)


def check_variables(dna: dna_lib.DNA, variables: Any, ind_id: str) -> None:
    """Raises CheckpointError unless `variables` has exactly the float32 shapes of `dna`."""
    try:
        got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(variables).items()}
    except (AttributeError, TypeError) as exc:
        raise CheckpointError(f"weights of {ind_id} are malformed: {exc}") from None
    want = {k: (tuple(s), np.dtype(np.float32)) for k, s in variable_shapes(dna).items()}
    if got != want:
        bad = sorted(
            str(k) for k in set(got) ^ set(want) | {k for k in got if got[k] != want.get(k)}
        )
        raise CheckpointError(f"weights of {ind_id} do not match its DNA: {bad[:3]}")


def parse_control(value: Any) -> dict:
    """The well-typed fields of the `control` meta file; wrong-typed ones are ignored, logged."""
    return Control.from_json(value).to_json()


@dataclasses.dataclass
class _Event:
    """What one event has seen and decided so far (for its summary if it is abandoned)."""

    number: int
    key: jax.Array
    members: list[Member] = dataclasses.field(default_factory=list)
    decision: Decision = Decision("initial")


@dataclasses.dataclass
class Pending:
    """A child that an event decided and mutated but has not trained yet (its first half)."""

    ev: _Event
    ind_id: str
    dna: dna_lib.DNA
    params: Any
    mutation: dict
    replaces_parent: bool = False
    timings: dict = dataclasses.field(default_factory=dict)  # seconds of the first half
    adopted: resume.Adopted | None = None  # a dead worker's child, resumed from its state

    @property
    def parent(self) -> str | None:
        return self.ev.decision.parent


@dataclasses.dataclass
class _Publication:
    """A child this worker is publishing in the background (`Worker.background_publish`)."""

    member: Member  # as the population listing will show it
    args: tuple  # of `Store.publish`
    future: concurrent.futures.Future | None = None  # None: not started yet
    killed: bool = False  # this worker's event killed it: it dies right after its publication
    kill: concurrent.futures.Future | None = None


@dataclasses.dataclass
class Worker:
    """One worker's context: its store, config, data and compiled-program cache.

    `evaluate` trains and validates a child; tests replace it with a synthetic fitness. An
    evaluator with a `prefetch(dna)` method is told each child's DNA as soon as it is known,
    so that it can compile the child's programs in the background.

    With `background_publish`, a trained child is written to the store on a background thread
    while the next child trains (a checkpoint's save is ~20 ms of CPU, packed:
    `scripts/bench_checkpoint.py`). The publication starts once the next child's programs are
    ready (an evaluator's `prepare(dna)`): the Python-bound work before training (selection,
    loading the parent, mutation, tracing and compiling) does not share the interpreter with
    it. The next event's selection lists the child as a member already (so that a one-worker
    run decides as if it had been published); an event that kills it has the publishing thread
    kill it right after its publication (the event does not wait); a child bred from one whose
    publication failed is abandoned. `settle` waits for the publication in flight; `run_worker`
    settles at its end.

    Nothing a single individual, meta file or storage hiccup does ends the worker: a lost
    race abandons the event; an individual that cannot be loaded, fitted to the data or
    trained is killed with its reason logged; a storage failure that outlived the store's
    retries abandons the event. Only errors of the run's own config propagate, and
    `PublishingError` once `PUBLISH_FAILURES_IN_A_ROW` publications in a row failed for a
    reason other than storage (this installation cannot publish anything).
    """

    store: Store
    cfg: EvolutionConfig
    worker_id: int
    evaluate: Evaluator
    input_channels: int
    num_classes: int
    event: int = 0
    children: int = 0
    seeded: bool = False  # the population has reached its set-point once (meta SEEDED)
    initials_in_flight: int = 0  # begun and not yet finished (with lookahead, at most one)
    resume_scan_seconds: float = resume.SCAN_SECONDS  # how often `adopt` looks for orphans
    known: KnownIndividuals = dataclasses.field(default_factory=KnownIndividuals, repr=False)
    background_publish: bool = False
    _next_scan: float = 0.0
    _publication: _Publication | None = dataclasses.field(default=None, repr=False)
    _publisher: concurrent.futures.ThreadPoolExecutor | None = dataclasses.field(
        default=None, repr=False
    )
    _lost: set[str] = dataclasses.field(default_factory=set, repr=False)  # publications failed
    _failed_in_a_row: int = 0  # publications failed, not for storage, since the last success

    def settle(self) -> str | None:
        """Waits for the child being published in the background, if any. Returns its id if
        its publication failed (logged; the child is lost, its children are abandoned).

        Raises:
            PublishingError: the last `PUBLISH_FAILURES_IN_A_ROW` publications all failed, for
                a reason other than storage (which a later publication may outlive).
        """
        self._start_publication()
        pub, self._publication = self._publication, None
        if pub is None:
            return None
        try:
            pub.future.result()
            if pub.kill is not None:
                pub.kill.result()  # never raises: `_kill_published` logs what fails
            self._failed_in_a_row = 0
            return None
        except Exception as exc:
            ind_id = pub.member.id
            log.warning("worker %d: publishing %s failed: %s", self.worker_id, ind_id, exc)
            self._lost.add(ind_id)
            self.known.discard(ind_id)
            self.children -= 1
            self._publication_failed(exc)
            return ind_id

    def _publication_failed(self, exc: BaseException) -> None:
        """Counts a failed publication; raises `PublishingError` at the limit."""
        if isinstance(exc, StoreError | OSError):
            return  # the store's fault: a later publication may outlive it
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= PUBLISH_FAILURES_IN_A_ROW:
            raise PublishingError(
                f"worker {self.worker_id}: the last {self._failed_in_a_row} publications "
                f"failed, the last with {type(exc).__name__}: {exc}; not a storage fault, so "
                "every child would be lost: check that the installed jax, flax and "
                "orbax-checkpoint are the versions this package asks for (pip install -e .)"
            ) from exc

    def close(self) -> None:
        """Settles the publication in flight and stops the publishing thread."""
        self.settle()
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None

    def _listing(self) -> list[Member]:
        """The population as the store lists it, plus the child being published (unless this
        worker killed it already: then without it, even if its kill has not run yet)."""
        members = self.store.population()
        pub = self._publication
        done = pub is not None and pub.future is not None and pub.future.done()
        if done and pub.future.exception() is not None:
            self.settle()  # failed: it is not a member
            pub = None
        if pub is not None:
            members = [m for m in members if m.id != pub.member.id]
            if not pub.killed:
                members.append(pub.member)
        return members

    def _start_publication(self) -> None:
        """Starts the background publication of the last child (and its kill), if not yet."""
        pub = self._publication
        if pub is None or pub.future is not None:
            return
        if self._publisher is None:
            self._publisher = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="evojax-nas-publish"
            )
        pub.future = self._publisher.submit(self.store.publish, *pub.args)
        if pub.killed:
            pub.kill = self._publisher.submit(self._kill_published, pub.member.id)

    def _kill(self, ind_id: str) -> None:
        """The event's kill. The child this worker is publishing is killed right after its
        publication, by the publishing thread, without waiting for it here."""
        pub = self._publication
        if pub is None or pub.member.id != ind_id:
            self.store.kill(ind_id)
        elif not pub.killed:
            pub.killed = True
            if pub.future is not None:
                pub.kill = self._publisher.submit(self._kill_published, ind_id)

    def _kill_published(self, ind_id: str) -> None:
        try:
            self.store.kill(ind_id)
        except (StoreError, OSError) as exc:
            # Its publication failed (`settle` says so), or another worker killed it first.
            log.info("worker %d: killing %s after its publication: %s", self.worker_id, ind_id, exc)

    def _settle_if(self, ind_id: str | None) -> None:
        """Before killing `ind_id`: waits for its publication if it is in flight.

        Raises:
            ConcurrencyError: its publication failed (there is nothing to kill).
        """
        pub = self._publication
        if ind_id is not None and pub is not None and pub.member.id == ind_id:
            if self.settle() == ind_id:
                raise ConcurrencyError(f"{ind_id} was never published")

    def step(self) -> dict:
        """One whole event; returns a summary dict (also what the progress display shows)."""
        summary, pending = self.begin()
        return summary if pending is None else self.finish(pending)

    def begin(self) -> tuple[dict, Pending | None]:
        """An event's first half: selection, the kill (at the set-point), and the new child's
        DNA and inherited weights. Reads and kills in the store; trains nothing.

        Returns:
            (summary, None) for an event that ended here (abandoned), or (summary, the child
            to `finish`).
        """
        ev = _Event(self.event, event_key(self.cfg.seed, self.worker_id, self.event))
        self.event += 1
        pending, summary = self._guarded(ev, lambda: self._first_half(ev))
        if pending is None:
            self._start_publication()  # no child trains next: publish the last one now
            return summary, None
        self.initials_in_flight += pending.parent is None
        prefetch = getattr(self.evaluate, "prefetch", None)
        if prefetch is not None:
            prefetch(pending.dna)
        return {"action": "begun", "id": pending.ind_id}, pending

    def finish(self, pending: Pending) -> dict:
        """An event's second half: trains the child, validates it, publishes it."""
        ev = pending.ev
        try:
            record, summary = self._guarded(ev, lambda: self._train_and_publish(pending))
        finally:
            self.initials_in_flight -= pending.parent is None
        if record is None:
            return summary
        if pending.replaces_parent:
            self._kill_quietly(pending.parent)
        summary = {"action": ev.decision.action, "population": len(ev.members) + 1, **record}
        if ev.decision.kill is not None:
            summary |= {"killed": ev.decision.kill, "population": len(ev.members)}
        return summary

    def resumes(self) -> bool:
        """Whether this worker saves long children's state and adopts dead workers' children:
        the run's `resume_interval_seconds` is set and its evaluator can resume training."""
        interval = self.cfg.resume_interval_seconds
        return bool(interval) and getattr(self.evaluate, "resumable", False)

    def adopt(self) -> dict | None:
        """Finishes one in-flight child of a dead (e.g. preempted) worker from its saved state.

        Looks at most every `resume_scan_seconds` (and at once again after an adoption).
        Returns the child's summary (as `finish` gives it, with "resumed"), or None when there
        was nothing to adopt. A damaged saved state is reported and dropped; store failures
        are logged; neither ends the worker.
        """
        now = time.monotonic()
        if not self.resumes() or now < self._next_scan:
            return None
        self._next_scan = now + self.resume_scan_seconds
        try:
            found = resume.adopt(self.store, self.worker_id, self.evaluate.config)
            if found is None:
                return None
        except NotImplementedError:  # a store without blobs: nothing was ever saved there
            self._next_scan = math.inf
            return None
        except (StoreError, OSError) as exc:
            log.warning("worker %d: looking for children to resume failed: %s", self.worker_id, exc)
            return None
        self._next_scan = 0.0  # there may be more
        c = found.child
        log.info("worker %d resumes %s at step %d", self.worker_id, c.id, found.step)
        beat = {"event": c.event, "action": "resume", "target": c.id, "step": found.step}
        members: list[Member] = []  # for the summary only: the child is ours to finish now
        with contextlib.suppress(StoreError, OSError):
            self.store.heartbeat(self.worker_id, beat | {"time": time.time()})
            members = self.store.population()
        ev = _Event(c.event, key_from_json(list(c.key)), members)
        ev.decision = Decision(c.action, c.kill, c.parent)
        pending = Pending(
            ev,
            c.id,
            dna_lib.from_dict(c.dna),
            found.variables,
            c.mutation,
            c.replaces_parent,
            dict(c.timings),
            adopted=found,
        )
        self.initials_in_flight += pending.parent is None
        summary = self.finish(pending)
        return summary | {"resumed": c.id, "resumed_at_step": found.step}

    def _first_half(self, ev: _Event) -> Pending:
        t0 = time.perf_counter()
        control = Control.from_json(self.store.read_meta(CONTROL)[0])
        ev.members = self._listing()
        ev.decision = decide(ev.members, ev.key, self.cfg, self._seeded(len(ev.members)))
        d = ev.decision
        info = {"event": ev.number, "action": d.action, "target": d.target}
        self.store.heartbeat(self.worker_id, info | {"time": (beat := time.time())})
        if d.action == "initial" and _initials_ahead(self, ev.members, beat):
            self.store.heartbeat(self.worker_id, {"action": "wait", "time": time.time()})
            time.sleep(0.5)  # the set-point's last initial individuals are being trained
            raise ConcurrencyError("initials in flight")
        if d.kill is not None:  # the worse dies first; losing this race voids the event
            self._kill(d.kill)
        selected = time.perf_counter() - t0
        if d.action == "initial":
            pending = self._initial(ev)
        else:
            birth = next(m.birth for m in ev.members if m.id == d.parent) / 1e9
            pending = self._child(ev, control, birth)
        pending.timings["select"] = selected
        return pending

    def _guarded(self, ev: _Event, fn: Callable[[], Any]) -> tuple[Any, dict | None]:
        """(fn(), None), or (None, the abandoned event's summary) when `fn` fails."""
        parent = lambda: ev.decision.parent  # noqa: E731  (decided inside fn)
        try:
            return fn(), None
        except PublishingError:
            raise  # not this event's fault: the worker cannot publish anything
        except ConcurrencyError as exc:
            return None, self._abandon(ev, exc)
        except NotFoundError as exc:
            # Listed alive yet unreadable: a phantom (its DNA or checkpoint is gone), unless it
            # died meanwhile. Killing it settles both cases: a phantom must not live forever.
            return None, self._drop(parent(), ev, exc)
        except BAD_INDIVIDUAL as exc:
            return None, self._drop(parent(), ev, exc)
        except (StoreError, OSError) as exc:  # the store's retries gave up, or a local fault
            log.warning("worker %d event %d: storage failed: %s", self.worker_id, ev.number, exc)
            if isinstance(exc, OSError):
                time.sleep(1.0)  # e.g. a full disk: do not spin
            return None, self._abandon(ev, exc)
        except Exception as exc:
            if ev.decision.action == "initial":
                raise  # an initial individual that cannot train is the run's own config's fault
            return None, self._drop(parent(), ev, exc)  # it cannot be trained

    def _abandon(self, ev: _Event, exc: BaseException) -> dict:
        log.info("worker %d event %d abandoned: %s", self.worker_id, ev.number, exc)
        return {"action": "abandoned", "reason": str(exc), "population": len(ev.members)}

    def _drop(self, ind_id: str | None, ev: _Event, exc: BaseException) -> dict:
        """Kills an individual this worker cannot use, logging why; the event is abandoned."""
        reason = f"{type(exc).__name__}: {exc}"
        if ind_id is not None:
            log.warning("worker %d: killing %s: %s", self.worker_id, ind_id, reason)
            self._kill_quietly(ind_id)
        return {
            "action": "abandoned",
            "reason": reason,
            "dropped": ind_id,
            "population": len(ev.members),
        }

    def _kill_quietly(self, ind_id: str | None) -> None:
        if ind_id is None:
            return
        try:
            self._settle_if(ind_id)
            self.store.kill(ind_id)
        except (StoreError, OSError):
            pass  # never published, killed by someone else, or cannot be killed: it is out

    def _seeded(self, population: int) -> bool:
        if not self.seeded:
            self.seeded = self.store.read_meta(SEEDED)[0] is not None
        if not self.seeded and population >= self.cfg.population:
            try:
                self.store.write_meta(SEEDED, {"time": time.time(), "worker": self.worker_id})
            except ConcurrencyError:
                pass  # another worker marked it first
            self.seeded = True
        return self.seeded

    def _initial(self, ev: _Event) -> Pending:
        t0 = time.perf_counter()
        dna, params = make_initial(
            ev.key, self.input_channels, self.num_classes, self.cfg.initial_learning_rate
        )
        return Pending(
            ev,
            initial_id(self.worker_id, ev.number),
            dna,
            params,
            mutation=dict(INITIAL_MUTATION),
            timings={"mutate": time.perf_counter() - t0},
        )

    def _child(self, ev: _Event, control: Control, parent_birth: float) -> Pending:
        t0 = time.perf_counter()
        parent_id = ev.decision.parent
        known = self.known.get(parent_id)
        if known is None:
            known = load_parent(self.store, parent_id, self.input_channels, self.num_classes)
            self.known.put(parent_id, *known)
        parent, params = known
        t1 = time.perf_counter()
        plan = plan_child(self.cfg, control, parent_birth, now=time.time())
        child, child_params, mutation = make_child(ev.key, parent, params, plan)
        timings = {"load_parent": t1 - t0, "mutate": time.perf_counter() - t1}
        return Pending(
            ev,
            child_id(self.worker_id, ev.number),
            child,
            child_params,
            mutation,
            plan.replaces_parent,
            timings,
        )

    def _checkpointer(self, p: Pending) -> resume.Checkpointer | None:
        if not self.resumes():
            return None
        a, d = p.adopted, p.ev.decision
        child = (
            a.child
            if a is not None
            else resume.Child(
                id=p.ind_id,
                worker=self.worker_id,
                event=p.ev.number,
                key=tuple(key_to_json(p.ev.key)),
                action=d.action,
                parent=d.parent,
                kill=d.kill,
                dna=dna_lib.to_dict(p.dna),
                mutation=p.mutation,
                replaces_parent=p.replaces_parent,
                timings=dict(p.timings),
            )
        )
        return resume.Checkpointer(
            self.store,
            child,
            p.params,
            self.cfg.resume_interval_seconds,
            owner=self.worker_id,
            owner_index=a.owner_index if a is not None else 0,
        )

    def _train_and_publish(self, p: Pending) -> dict:
        saver = self._checkpointer(p)
        try:
            record = self._train_and_publish_once(p, saver)
        except Exception:
            if saver is not None:
                saver.discard()  # the child is dropped or abandoned (not on KeyboardInterrupt)
            raise
        if saver is not None:
            saver.discard()
        return record

    def _train_and_publish_once(self, p: Pending, saver: resume.Checkpointer | None) -> dict:
        key = p.ev.key
        start = time.time()
        train_key = for_purpose(key, TRAIN)
        prepared = 0.0
        prepare = getattr(self.evaluate, "prepare", None)
        if self._publication is not None and prepare is not None:
            t0 = time.perf_counter()
            prepare(p.dna)  # its programs first, then the last child's publication
            prepared = time.perf_counter() - t0
        self._start_publication()
        if saver is None:
            result = self.evaluate(p.dna, p.params, train_key)
        else:
            a = p.adopted
            begin = (a.step, a.state) if a is not None else None
            result = self.evaluate(p.dna, p.params, train_key, start=begin, on_chunk=saver)
        self.settle()  # the previous child's publication, overlapped with this training
        if p.parent in self._lost:
            raise ConcurrencyError(f"its parent {p.parent} was never published")
        extra = {}
        if p.adopted is not None:  # all else as its maker would have published it
            extra["resumed"] = {"worker": self.worker_id, "step": p.adopted.step}
        record = Record(
            id=p.ind_id,
            parent=p.parent,
            mutation=p.mutation,
            worker=p.adopted.child.worker if p.adopted is not None else self.worker_id,
            event=p.ev.number,
            key=tuple(key_to_json(key)),
            seed=self.cfg.seed,
            learning_rate=p.dna.learning_rate,
            architecture=dna_lib.describe(p.dna),
            architecture_key=dna_lib.architecture_key(p.dna),
            val_accuracy=result.val_accuracy,
            diverged=result.diverged,
            steps=result.steps_run,
            flops=result.flops,
            flops_train_step=result.flops_train_step,
            flops_eval_batch=result.flops_eval_batch,
            params=result.param_count,
            train_seconds=time.time() - start,
            programs=result.programs,  # memory, shared (the run's store) or compiled
            timings=_merge_timings(p.timings, result.timings, prepared),
            device=device_info(),  # platform and device kind that trained it
            code=code_version(),  # the package code and JAX versions that trained it
            born=time.time(),
            extra=extra,
        ).to_json()
        self._publish(p, record, result)
        return record

    def _publish(self, p: Pending, record: dict, result: TrainResult) -> None:
        variables = result.variables  # host arrays no one changes; `known` keeps a copy
        args = (p.ind_id, dna_lib.to_dict(p.dna), record, result.val_accuracy, variables)
        if not self.background_publish:
            try:
                self.store.publish(*args)
            except Exception as exc:
                self._publication_failed(exc)  # at the limit, PublishingError instead
                raise
            self._failed_in_a_row = 0
        else:  # started by the next child's training (or `settle`)
            member = Member(p.ind_id, float(result.val_accuracy), time.time_ns())
            self._publication = _Publication(member, args)
        self.known.put(p.ind_id, p.dna, variables)
        self.children += 1


def _merge_timings(first_half: dict, training: dict, prepared: float) -> dict:
    """A child's timings: its first half's, then its training's, with the seconds spent
    preparing its programs before training (`Worker`, background publishing) in "compile"."""
    timings = {**first_half, **training}
    if prepared:
        timings["compile"] = timings.get("compile", 0.0) + prepared
    return timings


def _initials_ahead(worker: Worker, members: Sequence[Member], since: float) -> bool:
    """While seeding: do initial individuals in flight fill the set-point — the worker's own
    (with lookahead) and those other workers decided earlier?

    Without this, workers that decide at once create more initials than the set-point.
    """
    if worker.seeded:
        return False
    now, me, ahead = time.time(), (since, worker.worker_id), worker.initials_in_flight
    for w in worker.store.workers():
        t = w.get("time")
        if w.get("worker") == worker.worker_id:
            continue
        if w.get("action") == "initial" and not w.get("stopped") and isinstance(t, int | float):
            ahead += now - t < 90 and (w.get("since", t), w.get("worker", -1)) < me
    return len(members) + ahead >= worker.cfg.population


@dataclasses.dataclass
class TrainingEvaluator:
    """The real fitness: train on the train split, accuracy on the validation split.

    The data goes to the device once, here; `prefetch` starts compiling a child's programs
    in the background (see `evojax_nas.programs.ProgramCache`).
    """

    data: DeviceData
    config: TrainConfig
    cache: ProgramCache
    resumable = True  # takes `start` and `on_chunk` (`evojax_nas.resume`)

    def __call__(
        self,
        dna: dna_lib.DNA,
        params: Any,
        key: jax.Array,
        *,
        start: tuple[int, TrainState] | None = None,
        on_chunk: OnChunk | None = None,
    ) -> TrainResult:
        return train_and_evaluate(
            dna, params, self.data, key, self.config, self.cache, start=start, on_chunk=on_chunk
        )

    def prefetch(self, dna: dna_lib.DNA) -> None:
        self.cache.prefetch(dna, self.data.layout, self.config)

    def prepare(self, dna: dna_lib.DNA) -> None:
        self.cache.prepare(dna, self.data.layout, self.config)


# `train_impl: "auto"` trains layer-wise up to this many steps per child, on the platforms
# named: there a new architecture's whole-program compile costs more than its training, while
# layer-wise steps are slower. CPU: crossover measured between 800 and 2,000 steps (README,
# "Layer-wise training"). GPU (one H200, README "GPU"): at 200 steps layer-wise made 1.15x the
# children per minute of whole programs over the same 40 children (`bench_child.py
# --train-impl both`), and the quick job 184.9 against 81.2 per minute. There whole programs
# cost ~0.5 s of compiling per child (~0.9 s per new architecture), layer programs ~0.04 s,
# and a layer-wise step 0.6-0.8 ms more: the two would meet at roughly 600-800 steps
# (estimated from those parts, not measured; the limit stays below). TPU: not measured.
LAYERWISE_MAX_STEPS = {"cpu": 1000, "gpu": 500}


def resolve_train_impl(impl: str, steps: int, platform: str | None = None) -> str:
    """`impl` ("auto", "whole" or "layerwise") with "auto" resolved for training `steps` steps
    on `platform` (default: JAX's)."""
    if impl != "auto":
        return impl
    limit = LAYERWISE_MAX_STEPS.get(platform or jax.default_backend(), 0)
    return "layerwise" if steps <= limit else "whole"


def train_config(cfg: EvolutionConfig, platform: str | None = None) -> TrainConfig:
    """How a run trains each child (on `platform`, default: JAX's)."""
    return TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eval_batch_size=cfg.eval_batch_size,
        train_impl=resolve_train_impl(cfg.train_impl, cfg.steps, platform),
    )


def program_cache(store: Store | None, cfg: EvolutionConfig) -> ProgramCache:
    """A worker's program cache: shared through the run's store unless the config says not."""
    shared = SharedPrograms(store) if store is not None and cfg.compile_cache == "store" else None
    return ProgramCache(shared=shared)


def background_compile(cfg: EvolutionConfig, platform: str | None = None) -> bool:
    """Whether workers compile the next child's programs while the current one trains.

    Automatic (config null): on an accelerator (the host's CPUs are idle while the chip
    trains), off on a CPU, where training already uses every core: measured with one worker on
    2 cores (`scripts/bench_child.py --lookahead both`), compiling in the background slowed
    training more than it hid compiles; with the default job's two layer-wise workers
    (`scripts/bench_lookahead.py`) it cut their time not training from 19-29 % to 7-9 % and their
    children per minute by 4-7 %: training absorbs the compile (README, "Compiling").
    """
    if cfg.background_compile is not None:
        return cfg.background_compile
    return (platform or jax.default_backend()) != "cpu"


def training_evaluator(
    dataset, cfg: EvolutionConfig, cache: ProgramCache | None = None
) -> TrainingEvaluator:
    """The real fitness of a run's children on `dataset` (uploaded to the device once)."""
    train_cfg = train_config(cfg)
    data = DeviceData.upload(dataset, train_cfg.eval_batch_size)
    return TrainingEvaluator(data, train_cfg, cache if cache is not None else ProgramCache())


def run_worker(
    worker: Worker,
    *,
    max_children: int | None,
    deadline: float | None,
    on_event: Callable[[dict], None] | None = None,
    gc_every: int = 25,
    lookahead: bool = False,
    keep_going: Callable[[], bool] = lambda: True,
) -> int:
    """Steps until this worker has trained `max_children` or the deadline passes.

    With `lookahead`, the next event's first half (selection, mutation — and, through the
    evaluator's `prefetch`, the compile of the child's programs) runs while the current child
    trains. Each event stays fully determined by its key and the parent it records; its
    selection just does not see the child still in training. A child already begun when the
    deadline passes is finished, as an in-flight child always is. `keep_going` is asked
    before each new event (a stop request ends the loop between children).
    """

    def more(in_flight: int) -> bool:
        return (
            (max_children is None or worker.children + in_flight < max_children)
            and (deadline is None or time.time() < deadline)
            and keep_going()
        )

    def emit(summary: dict) -> None:
        summary["worker"] = worker.worker_id
        if on_event is not None:
            on_event(summary)
        if worker.event % gc_every == 0:
            worker.store.gc(worker.cfg.gc_grace_seconds)
            if worker.resumes():
                resume.collect(worker.store)

    def begin_child(in_flight: int) -> Pending | None:
        """Runs events until one begins a child (kills and abandoned events end at once);
        first finishes any child of a dead worker that it can adopt (`Worker.adopt`)."""
        while more(in_flight):
            adopted = worker.adopt()
            if adopted is not None:
                emit(adopted)
                continue
            summary, pending = worker.begin()
            if pending is not None:
                return pending
            emit(summary)
        return None

    try:
        pending = begin_child(0)
        while pending is not None:
            following = None
            if lookahead and more(1):  # one try: an abandoned event must not delay this child
                summary, following = worker.begin()
                if following is None:
                    emit(summary)
            emit(worker.finish(pending))
            pending = following if following is not None else begin_child(0)
    finally:
        worker.close()  # the last child's publication, if it is in the background
    return worker.children
