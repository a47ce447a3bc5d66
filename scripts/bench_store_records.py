"""A GCS store's `records()`: reads on a thread pool against one after another, in one run.

    python scripts/bench_store_records.py                       # 400 records, the emulator
    python scripts/bench_store_records.py --url gs://BUCKET/RUN --records 0   # a real run

`status`, `report`, and `evolve` or a worker joining a run read every individual's record, one
GCS object each. `GCSRecordsMixin.records()` reads `record_readers` (8) at a time; this times
it against `record_readers = 1` (one after another, as before), alternating, and checks that
both return the same records. On the local emulator (started here, fake-gcs-server) a read is
a local round trip, so the ratio understates what concurrency saves against GCS's ~10-50 ms
per read; `--latency-ms L` adds L ms of waiting to every read (a simulated round trip: the
thread sleeps, as it waits on a socket). `--records N` first publishes N small records (no
weights) into the store.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from evojax_nas.store import open_store  # noqa: E402

DNA = {"vertices": [{"id": 0, "type": "linear"}], "edges": [], "learning_rate": 0.1}


def fill(store, n: int) -> None:
    """Publishes `n` records without weights (`r000000`, ...), a tenth of them killed."""
    for i in range(n):
        store.publish(f"r{i:06d}", DNA, {"parent": None, "born": time.time()}, i / max(n, 1), None)
        if i % 10 == 0:
            store.kill(f"r{i:06d}")


def bench(store, repeats: int, latency_ms: float = 0.0) -> dict:
    """Seconds of `store.records()` with 1 reader and with the store's readers, alternating;
    every object read waits `latency_ms` first."""
    if latency_ms:
        get = store._get

        def slow_get(rel: str) -> bytes:
            time.sleep(latency_ms / 1e3)
            return get(rel)

        store._get = slow_get
    readers = store.record_readers
    seconds: dict[int, list[float]] = {1: [], readers: []}
    results = {}
    for r in range(repeats):
        for n in (1, readers) if r % 2 == 0 else (readers, 1):
            store.record_readers = n
            t0 = time.perf_counter()
            results[n] = store.records()
            seconds[n].append(time.perf_counter() - t0)
    store.record_readers = readers
    med = {n: statistics.median(s) for n, s in seconds.items()}
    return {
        "latency_ms": latency_ms,
        "records": len(results[readers]),
        "readers": readers,
        "seconds": {str(n): s for n, s in seconds.items()},
        "ratio_one_over_many": med[1] / max(med[readers], 1e-9),
        "same_records": results[1] == results[readers],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a gs:// store (default: a new one on a local emulator)")
    p.add_argument("--records", type=int, default=400, help="records to publish first")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated wait per read")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    emulator = None
    if not args.url:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
        from gcs_emulator import create_bucket, start_emulator

        emulator, host = start_emulator()
        os.environ["STORAGE_EMULATOR_HOST"] = host
        create_bucket(host, "bench")
    try:
        store = open_store(args.url or f"gs://bench/records-{os.getpid()}")
        fill(store, args.records)
        res = bench(store, args.repeats, args.latency_ms)
    finally:
        if emulator is not None:
            emulator.terminate()
    if args.json:
        print(json.dumps(res))
    else:
        one = statistics.median(res["seconds"]["1"])
        many = statistics.median(res["seconds"][str(res["readers"])])
        print(
            f"{res['records']} records, {args.latency_ms:g} ms added per read: 1 reader "
            f"{one:.2f} s, {res['readers']} readers {many:.2f} s (median of {args.repeats}): "
            f"{res['ratio_one_over_many']:.2f}x; same records: {res['same_records']}"
        )
    return 0 if res["same_records"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
