"""Typed run state: records and control round-trip; meta updates by compare-and-swap."""

import threading

import pytest

from evojax_nas.errors import ConcurrencyError
from evojax_nas.state import CONTROL, RECORD_FORMAT, Control, Record
from evojax_nas.store import open_store

OLD_RECORD = {  # a record as the code before `format` wrote it
    "id": "w000-e000003",
    "parent": "init-000-000001",
    "mutation": {"names": ["identity"], "count": 1, "inherit": True, "weights": {"identity": 1}},
    "worker": 0,
    "event": 3,
    "key": [0, 42],
    "seed": 0,
    "learning_rate": 0.1,
    "architecture": "in(1) → out",
    "architecture_key": "abc",
    "val_accuracy": 0.5,
    "diverged": False,
    "steps": 10,
    "flops": 1e6,
    "params": 100,
    "train_seconds": 1.5,
    "timings": {"train": 1.0},
    "born": 1700000000.0,
    "alive": True,  # added by a store's reader
}


def test_an_old_record_parses_and_writes_back_unchanged_but_for_its_format():
    r = Record.from_json(OLD_RECORD)
    assert r.format == RECORD_FORMAT and r.key == (0, 42) and r.extra == {"alive": True}
    out = r.to_json()
    assert {k: v for k, v in out.items() if k in OLD_RECORD} == OLD_RECORD
    assert Record.from_json(out) == r


def test_a_newer_record_format_or_a_non_record_is_refused():
    with pytest.raises(ValueError, match="format"):
        Record.from_json({**OLD_RECORD, "format": RECORD_FORMAT + 1})
    with pytest.raises(ValueError):
        Record.from_json({"parent": None})


def test_control_keeps_well_typed_fields_only():
    c = Control.from_json({"mutations_per_child": 5, "mutations_until": "soon", "reset_at": 7})
    assert c == Control(mutations_per_child=5, reset_at=7)
    assert c.to_json() == {"mutations_per_child": 5, "reset_at": 7}
    assert Control.from_json(None) == Control() == Control.from_json([1])
    assert Control.from_json({"mutations_per_child": 1000}) == Control()


def test_update_meta_loses_no_update_under_concurrent_writers(tmp_path):
    store = open_store(str(tmp_path / "run"))

    def bump(n):
        for _ in range(n):
            store.update_meta("counter", lambda v: {"n": (v or {}).get("n", 0) + 1}, attempts=None)

    # Fewer writes in all than LocalStore keeps old versions (8): more could let a writer
    # stalled between its listing and its create win against a version already deleted.
    threads = [threading.Thread(target=bump, args=(3,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_meta("counter")[0] == {"n": 6}


def test_update_meta_gives_up_after_its_attempts(tmp_path):
    store = open_store(str(tmp_path / "run"))

    def interfere(value):  # another writer wins every race
        current, version = store.read_meta(CONTROL)
        store.write_meta(CONTROL, {"n": (current or {}).get("n", 0) + 1}, version)
        return {"mine": True}

    with pytest.raises(ConcurrencyError):
        store.update_meta(CONTROL, interfere, attempts=3)
    assert store.read_meta(CONTROL)[0] == {"n": 3}
