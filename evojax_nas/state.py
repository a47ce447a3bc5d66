"""The run's state as the store holds it: meta file names, typed control and records.

Light to import (no JAX): `adjust`, `status` and the store's readers use it. Records and the
control file are JSON objects in the store; `Record` and `Control` are their typed, frozen
views, each with one (de)serialiser. Records written before `RECORD_FORMAT` existed parse as
format 1 (their layout is the same).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)

# Meta files (small run-wide JSON side files; `Store.read_meta` / `Store.update_meta`).
CONTROL = "control"  # what `adjust` set: Control; workers read it at each event
HISTORY = "history"  # {"events": [...]}: what `adjust` did and when (drawn on Figure 1)
SEEDED = "seeded"  # the initial population has reached its set-point once
FINISHED = "finished"  # the run's time budget is spent (written by the worker that saw it)
WORKER_COUNTER = "worker-ids"  # {"next": the next unclaimed worker ID}
TEST_CACHE = "test-accuracy"  # {"dataset", "individuals": {id: acc|null}, "ensembles"}

MAX_MUTATIONS = 100  # the most mutations per child `adjust` accepts (workers ignore more)
RECORD_FORMAT = 1  # the layout of the record a worker publishes with each individual


def child_id(worker_id: int, event: int) -> str:
    """The ID of the child worker `worker_id` makes at its event `event`."""
    return f"w{worker_id:03d}-e{event:06d}"


def initial_id(worker_id: int, event: int) -> str:
    """The ID of an initial individual (the paper's trivial start) a worker makes."""
    return f"init-{worker_id:03d}-{event:06d}"


def worker_of(ind_id: str) -> int | None:
    """The worker that made individual `ind_id` (`child_id`, `initial_id`), or None."""
    parts = ind_id.split("-")
    try:
        if len(parts) == 2 and parts[0].startswith("w") and parts[1].startswith("e"):
            return int(parts[0][1:])
        if len(parts) == 3 and parts[0] == "init":
            return int(parts[1])
    except ValueError:
        pass
    return None


@dataclasses.dataclass(frozen=True)
class Control:
    """The `control` meta file: a run's steering by `adjust` (paper §5)."""

    mutations_per_child: int | None = None  # a period of a higher mutation rate …
    mutations_until: float | None = None  # … until this Unix time (None: until changed)
    reset_at: float | None = None  # individuals born before this are retrained from scratch

    @classmethod
    def from_json(cls, value: Any) -> Control:
        """The well-typed fields of `value`; wrong-typed ones are ignored (and logged)."""
        if not isinstance(value, dict):
            if value is not None:
                log.warning("ignoring meta/%s: not a JSON object", CONTROL)
            return cls()
        out = {}
        for name, ok in (
            ("mutations_per_child", lambda v: type(v) is int and 1 <= v <= MAX_MUTATIONS),
            ("mutations_until", lambda v: type(v) in (int, float)),
            ("reset_at", lambda v: type(v) in (int, float)),
        ):
            if name in value and ok(value[name]):
                out[name] = value[name]
            elif name in value:
                log.warning("ignoring meta/%s field %s=%r: wrong type", CONTROL, name, value[name])
        return cls(**out)

    def to_json(self) -> dict:
        """The JSON object (fields that are set only)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Record:
    """What the store keeps about one trained individual (its `record`).

    Fields the worker writes are typed here; anything else a store adds or an older or newer
    version wrote is kept in `extra` and written back unchanged.
    """

    id: str
    parent: str | None
    key: tuple[int, ...]  # the event's key (`evojax_nas.keys.key_to_json`)
    mutation: dict = dataclasses.field(default_factory=dict)
    worker: int | None = None
    event: int | None = None
    seed: int | None = None
    learning_rate: float | None = None
    architecture: str | None = None
    architecture_key: str | None = None
    val_accuracy: float = 0.0
    diverged: bool = False
    steps: int | None = None
    flops: float = 0.0
    flops_train_step: float | None = None
    flops_eval_batch: float | None = None
    params: int | None = None
    train_seconds: float | None = None
    programs: Any = None
    timings: dict = dataclasses.field(default_factory=dict)
    device: dict | None = None
    code: dict | None = None  # `programs.code_version()` of the worker that trained it
    born: float | None = None
    format: int = RECORD_FORMAT
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, value: dict) -> Record:
        """Parses a record (any format up to `RECORD_FORMAT`; unknown fields go to `extra`).

        Raises:
            ValueError: not a record (no id, or a newer format than this code reads).
        """
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            raise ValueError(f"not a record: {value!r:.80}")
        fmt = value.get("format", 1)
        if not isinstance(fmt, int) or fmt > RECORD_FORMAT:
            raise ValueError(f"record {value['id']} has format {fmt!r}; this code reads up to 1")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in value.items() if k in names}
        known["key"] = tuple(value.get("key") or ())
        known.setdefault("parent", None)
        return cls(**known, extra={k: v for k, v in value.items() if k not in names})

    def to_json(self) -> dict:
        """The JSON object the store holds (`from_json(r.to_json()) == r`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["key"] = list(self.key)
        return {**out, **self.extra}
