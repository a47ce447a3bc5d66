"""Where a finished run's worker time went: the phases its records time, and the rest.

    .venv/bin/python scripts/worker_time.py RUN [RUN ...] [--json]

For each worker of a run, from its first heartbeat (written once it has loaded the data: the
process start before it is not counted) to its last (`stopped`; a worker still running or one
that died ends at its last child), the wall time is split into the phases every child's record times
(`select`, `load_parent`, `mutate`, `compile`, `train`, `eval`, `download`), the time between
one child's birth and the next child's timed phases that no record times (publishing the child,
killing the tournament's loser, reading the run's control file, heartbeats), and the time
before the first and after the last child. It prints each part's share of all workers' time
and the **non-training share** (everything but `train`): issue 9's figure for the default job.
RUN is any store URL `evojax-nas` takes (a local directory, gs://...).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

UNTIMED = "between children (publish, kill, control, heartbeat)"
EDGES = "before the first / after the last child"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    return p.parse_args(argv)


def worker_time(records: list[dict], heartbeats: list[dict]) -> dict:
    """Seconds per part of every worker's wall time, summed over workers, and the shares."""
    parts: collections.Counter = collections.Counter()
    wall, gaps, children = 0.0, [], 0
    by_worker = collections.defaultdict(list)
    for r in records:
        if isinstance(r.get("timings"), dict) and isinstance(r.get("born"), int | float):
            by_worker[r.get("worker")].append(r)
    beats = {h["worker"]: h for h in heartbeats}
    for worker, mine in sorted(by_worker.items(), key=lambda kv: str(kv[0])):
        mine.sort(key=lambda r: r["born"])
        timed = [sum(r["timings"].values()) for r in mine]
        beat = beats.get(worker, {})
        start = beat.get("started", mine[0]["born"] - timed[0])
        stop = beat.get("stopped") or mine[-1]["born"]
        wall += stop - start
        children += len(mine)
        for r in mine:
            parts.update(r["timings"])
        between = [
            b["born"] - a["born"] - t
            for a, b, t in zip(mine[:-1], mine[1:], timed[1:], strict=True)
        ]
        gaps += between
        parts[UNTIMED] += sum(between)
        parts[EDGES] += (mine[0]["born"] - timed[0] - start) + (stop - mine[-1]["born"])
    shares = {k: v / wall for k, v in parts.most_common()} if wall > 0 else {}
    return {
        "workers": len(by_worker),
        "children": children,
        "worker_seconds": wall,
        "seconds": dict(parts.most_common()),
        "shares": shares,
        "non_training_share": 1 - shares.get("train", 0.0) if shares else None,
        "between_children_median_seconds": statistics.median(gaps) if gaps else None,
    }


def main(argv=None) -> int:
    from evojax_nas.store import open_store

    args = parse_args(argv)
    for url in args.runs:
        store = open_store(url)
        out = {"run": store.url, **worker_time(store.records(), store.workers())}
        if args.json:
            print(json.dumps(out))
            continue
        print(
            f"{out['run']}: {out['workers']} workers, {out['children']} children, "
            f"{out['worker_seconds'] / 60:.1f} worker-minutes"
        )
        for part, share in out["shares"].items():
            print(f"  {part:<52} {out['seconds'][part]:8.1f} s {100 * share:6.1f} %")
        if out["non_training_share"] is not None:
            gap = out["between_children_median_seconds"]
            print(
                f"  non-training share {100 * out['non_training_share']:.1f} %"
                + (f"; between children: median {1e3 * gap:.0f} ms" if gap is not None else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
