"""Chaos: workers SIGKILLed at random and at protocol points, a storage stall, one damaged
individual. Afterwards nothing is lost, duplicated or partial, gc leaves no orphans, the
population is at its set-point, and every individual replays bit for bit.

Workers are forked from a forkserver that imported JAX once (a spawn per restart would cost
seconds); their fitness is synthetic (a function of the architecture), so the test measures the
protocol, not training. Workers with odd IDs publish on a background thread (as `evolve`'s
worker processes do), so its protocol points are hit on that thread too; such a worker logs a
child as published only once the next child's training has settled its publication. The
figures it prints (`pytest -s`) are quoted in the README.
"""

import contextlib
import dataclasses
import errno
import json
import multiprocessing as mp
import os
import random
import signal
import time

import jax

from evojax_nas.config import EvolutionConfig
from evojax_nas.store import LocalStore, RetryingStore
from evojax_nas.train import TrainResult

POINTS = ("after-claim", "in-checkpoint", "after-kill", "after-publish")
CHAOS_SECONDS = 20.0
MAX_CHAOS_SECONDS = 120.0
WORKERS = 3
CFG = dataclasses.replace(
    EvolutionConfig(population=6, seed=5), gc_grace_seconds=3600.0, dataset="mnist"
)


def synthetic(dna, params, key):
    """Deterministic fitness: more convolutions are better, plus key-derived noise."""
    fit = min(0.9, 0.1 + 0.1 * len(dna.conv_edges()) + 0.01 * float(jax.random.uniform(key)))
    return TrainResult(params, fit, False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})


class Stalling:
    """A store that fails with EIO while the file `stall` exists (a frozen storage service)."""

    def __init__(self, store, stall):
        self._store, self._stall = store, stall

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kw):
            if os.path.exists(self._stall):
                raise OSError(errno.EIO, "storage stalled")
            return attr(*args, **kw)

        return call


def _die_at(point: str, nth: int) -> None:
    """Makes this process SIGKILL itself on the nth pass through a protocol point."""
    from evojax_nas.store import _checkpoint, local

    targets = {
        "after-claim": (local.LocalStore, "_claim"),
        "in-checkpoint": (_checkpoint, "save"),
        "after-kill": (local.LocalStore, "kill"),
        "after-publish": (local.LocalStore, "publish"),
    }
    owner, name = targets[point]
    original, calls = getattr(owner, name), [0]

    def dying(*args, **kw):
        out = original(*args, **kw)
        calls[0] += 1
        if calls[0] >= nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, dying)


def chaos_worker(root: str, wid: int, point: str | None, nth: int) -> None:
    """One worker process: steps forever, logging each publication it saw succeed."""
    from evojax_nas.evolution import Worker

    if point is not None:
        _die_at(point, nth)
    store = RetryingStore(Stalling(LocalStore(root), root + ".stall"), first=0.05, cap=0.4)
    background = wid % 2 == 1  # half the workers publish on a background thread, as `evolve`'s
    worker = Worker(
        store, CFG, wid, synthetic, input_channels=1, num_classes=10, background_publish=background
    )
    unsettled = None  # publishing in the background: the last child, not yet known published
    with open(os.path.join(os.path.dirname(root), f"published-{wid}.log"), "a") as log:
        while True:
            out = worker.step()
            if out["action"] not in ("initial", "reproduce"):
                continue
            done = out["id"]
            if background:  # training this child settled the last one's publication
                done, unsettled = unsettled, done
                if done in worker._lost:  # its publication failed: it was never published
                    done = None
            if done is not None:
                log.write(done + "\n")
                log.flush()


def _sigkill(p) -> None:
    """SIGKILLs a worker process and reaps it. It may have died and been reaped already:
    `Process.start()` reaps every finished child, so its PID may be gone (or reused)."""
    if p.is_alive():
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    p.join()


def _markers(root: str) -> dict[str, list[str]]:
    from evojax_nas.store._validate import parse_marker

    seen: dict[str, list[str]] = {}
    for state in ("alive", "dead", "gone"):
        for name in os.listdir(os.path.join(root, state)):
            seen.setdefault(parse_marker(name)[0], []).append(state)
    return seen


def _run_chaos(root: str, rng: random.Random) -> dict:
    from evojax_nas.runner import claim_worker_id

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["jax", "evojax_nas.evolution", "tests.test_chaos"])
    store = LocalStore(root)
    stats = {"sigkill_random": 0, "died_at_point": 0, "restarts": 0, **{p: 0 for p in POINTS}}
    procs: dict[int, tuple] = {}
    start = time.time()
    damaged = stalled = False
    try:
        # At least CHAOS_SECONDS; on a loaded machine longer, until the protocol points
        # have been hit often enough for the assertions below to mean something.
        def enough() -> bool:
            return stats["restarts"] >= 8 + WORKERS and stats["died_at_point"] >= 4

        while time.time() - start < CHAOS_SECONDS or (
            not enough() and time.time() - start < MAX_CHAOS_SECONDS
        ):
            for wid, (p, deadline) in list(procs.items()):
                if not p.is_alive():
                    p.join()
                    assert p.exitcode == -signal.SIGKILL, p.exitcode  # never any other death
                    stats["died_at_point"] += 1
                    del procs[wid]
                elif deadline is not None and time.time() > deadline:
                    _sigkill(p)
                    stats["sigkill_random"] += 1
                    del procs[wid]
            while len(procs) < WORKERS:
                wid = claim_worker_id(store)
                # each protocol point once first, then a random mix with random SIGKILLs
                point = POINTS[stats["restarts"]] if stats["restarts"] < len(POINTS) else None
                point = point or rng.choice((*POINTS, None, None))
                nth = rng.randint(1, 4)
                if point:
                    stats[point] += 1
                p = ctx.Process(target=chaos_worker, args=(root, wid, point, nth), daemon=True)
                p.start()
                deadline = None if point else time.time() + rng.uniform(1.0, 5.0)
                procs[wid] = (p, deadline)
                stats["restarts"] += 1
            elapsed = time.time() - start
            if not damaged and elapsed > 4 and len(store.population()) >= CFG.population:
                store.publish("damaged", _dna(), {"parent": None}, 1.0, None)
                with open(os.path.join(root, "inds", "damaged", "dna.json"), "w") as f:
                    f.write('{"vertices": [')  # truncated, as by a crash; fitness 1.0 wins
                damaged = True
            if not stalled and elapsed > 8:
                open(root + ".stall", "w").close()  # storage frozen for 3 s
                stalled = True
            if stalled and elapsed > 11 and os.path.exists(root + ".stall"):
                os.unlink(root + ".stall")
            time.sleep(0.05)
    finally:
        for p, _ in procs.values():
            _sigkill(p)
        if os.path.exists(root + ".stall"):
            os.unlink(root + ".stall")
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # leave no process behind (private, but stable in 3.11+)
    stats["restarts"] -= WORKERS  # the first start of each slot is not a restart
    return stats


def _dna() -> dict:
    from evojax_nas import dna as D

    return D.to_dict(D.initial_dna(1, 10))


def test_a_run_survives_sigkills_a_stall_and_a_damaged_individual(tmp_path, monkeypatch):
    from evojax_nas.evolution import Worker
    from evojax_nas.replay import REPRODUCED, replay_many
    from evojax_nas.runner import settle
    from evojax_nas.store import local

    root = str(tmp_path / "run")
    store = LocalStore(root)
    store.write_config(CFG.to_dict())
    began = time.time()
    stats = _run_chaos(root, random.Random(0))
    assert stats["restarts"] >= 8 and stats["died_at_point"] >= 4, stats
    assert all(stats[p] for p in POINTS), stats

    # Recovery: one more worker refills what the kills took; settle trims the excess.
    worker = Worker(store, CFG, 999, synthetic, input_channels=1, num_classes=10)
    for _ in range(50):
        if len(store.population()) >= CFG.population:
            break
        worker.step()
    settle(store, CFG)
    alive = {m.id for m in store.population()}
    assert len(alive) == CFG.population
    assert "damaged" not in alive and _markers(root)["damaged"] == ["dead"]

    markers = _markers(root)
    published = {
        line.strip()
        for name in os.listdir(tmp_path)
        if name.startswith("published-")
        for line in open(tmp_path / name)
    }
    lost = published - set(markers)
    duplicated = {i for i, states in markers.items() if len(states) > 1}
    partial = {
        i
        for i in markers
        if i != "damaged"
        and not all(
            os.path.exists(os.path.join(root, "inds", i, f))
            for f in ("dna.json", "record.json", "ckpt")
        )
    }
    assert (lost, duplicated, partial) == (set(), set(), set())

    ids = sorted(set(markers) - {"damaged"})
    verdicts = replay_many(store, ids, synthetic, 1, 10)
    bad = [v for v in verdicts if v["verdict"] != REPRODUCED]
    assert not bad, bad[:3]

    orphans_before = sorted(set(os.listdir(os.path.join(root, "inds"))) - set(markers))
    leftovers_before = len(os.listdir(os.path.join(root, "tmp")))
    monkeypatch.setattr(local, "_CLAIM_GRACE", 0.0)
    monkeypatch.setattr(local, "_TMP_GRACE", 0.0)
    time.sleep(0.01)
    LocalStore(root).gc(0)
    markers = _markers(root)
    orphans = set(os.listdir(os.path.join(root, "inds"))) - set(markers)
    assert orphans == set() and os.listdir(os.path.join(root, "tmp")) == []
    assert len(store.population()) == CFG.population

    figures = stats | {
        "individuals": len(markers),
        "published_acknowledged": len(published),
        "replayed_bit_for_bit": len(verdicts),
        "orphans_collected": len(orphans_before),
        "tmp_leftovers_collected": leftovers_before,
        "lost": 0,
        "duplicated": 0,
        "partial": 0,
        "seconds": round(time.time() - began, 1),
    }
    print("chaos figures:", json.dumps(figures, sort_keys=True))
