"""`evojax-nas report`, `compare`, `export` and `adjust`: read a run, or steer a live one.

`adjust` is the paper's escape from local optima (§5, Figure 4): a period of a higher mutation
rate, or a population-wide weight reset. It writes the run's `control` meta (which every worker
reads at its next step) and appends the change to the run's `history`, drawn on Figure 1.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from evojax_nas.cli_common import STORE_HELP
from evojax_nas.errors import ConcurrencyError, EvojaxNasError
from evojax_nas.stall import summary_lines as stall_lines
from evojax_nas.state import CONTROL, HISTORY, MAX_MUTATIONS
from evojax_nas.store import Store


def _update_meta(store: Store, name: str, change) -> dict:
    """Read-modify-write of a meta file (compare-and-swap), as a user error when it fails."""
    try:
        return store.update_meta(name, lambda v: change(dict(v or {})), pause=0.05)
    except ConcurrencyError:
        raise EvojaxNasError(
            f"could not update {name} of {store.url}: too many concurrent writers"
        ) from None


def adjust(
    store: Store,
    *,
    mutations_per_child: int | None = None,
    for_minutes: float | None = None,
    reset_all_weights: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Steers a live run; workers apply the change at their next step.

    Args:
        store: the run's store.
        mutations_per_child: mutations applied to each child from now on (the paper's period
            of increased mutation rate); the run's config value restores the normal rate.
        for_minutes: length of that period; None means until changed again.
        reset_all_weights: every lineage's next child starts from fresh weights (the paper's
            population-wide weight reset).
        now: the time of the change (tests); default `time.time()`.

    Returns:
        The new control dict.

    Raises:
        EvojaxNasError: nothing to change, a bad value, or no run at `store`.
    """
    if mutations_per_child is None and not reset_all_weights:
        raise EvojaxNasError(
            "nothing to adjust: give --mutations-per-child K or --reset-all-weights"
        )
    if mutations_per_child is not None and not 1 <= mutations_per_child <= MAX_MUTATIONS:
        raise EvojaxNasError(
            f"--mutations-per-child must be between 1 and {MAX_MUTATIONS}, got "
            f"{mutations_per_child}"
        )
    if for_minutes is not None and (mutations_per_child is None or for_minutes <= 0):
        raise EvojaxNasError("--for-minutes needs --mutations-per-child and a positive value")
    store.read_config()  # NotFoundError (a user error) when there is no run here
    now = time.time() if now is None else now
    events = []

    def change(control: dict) -> dict:
        events.clear()  # a retried compare-and-swap runs this again
        if mutations_per_child is not None:
            control["mutations_per_child"] = mutations_per_child
            control.pop("mutations_until", None)
            if for_minutes is not None:
                control["mutations_until"] = now + 60 * for_minutes
            events.append(
                {
                    "time": now,
                    "kind": "mutation_rate",
                    "mutations_per_child": mutations_per_child,
                    "until": control.get("mutations_until"),
                }
            )
        if reset_all_weights:
            control["reset_at"] = now
            events.append({"time": now, "kind": "weight_reset"})
        return control

    control = _update_meta(store, CONTROL, change)
    _update_meta(store, HISTORY, lambda h: {"events": [*h.get("events", []), *events]})
    return control


def add_command(sub) -> None:
    r = sub.add_parser("report", help="the best individual's test accuracy, plots, ensemble")
    r.add_argument("store", help=STORE_HELP)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--ensemble", type=int, default=3, metavar="K", help="top-K vote (3)")
    r.add_argument("--out", help="where plots go (default: <run>/report, or ./report-<name>)")
    r.set_defaults(handler=run_report)

    c = sub.add_parser("compare", help="several runs on one Figure-2 plot, with a table")
    c.add_argument("stores", nargs="+", help="run stores; grouped by selection/inheritance")
    c.add_argument("--labels", nargs="+", help="a group label per store (default: automatic)")
    c.add_argument("--out", default="compare.png", help="the plot (compare.png)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(handler=run_compare)

    e = sub.add_parser("export", help="write the best individual (or ensemble) as a model")
    e.add_argument("store", help=STORE_HELP)
    e.add_argument("--out", required=True, help="a new directory")
    e.add_argument("--ensemble", type=int, default=1, metavar="K", help="top-K vote (1)")
    e.set_defaults(handler=run_export)

    a = sub.add_parser("adjust", help="steer a live run: mutation rate, weight reset")
    a.add_argument("store", help=STORE_HELP)
    a.add_argument(
        "--mutations-per-child",
        type=int,
        metavar="K",
        help="mutations per child from now on (the run's config value ends a period early)",
    )
    a.add_argument("--for-minutes", type=float, metavar="M", help="length of that period")
    a.add_argument(
        "--reset-all-weights",
        action="store_true",
        help="each lineage's next child starts from fresh weights",
    )
    a.set_defaults(handler=run_adjust)


def run_report(args: argparse.Namespace) -> int:
    from evojax_nas.report import write_report
    from evojax_nas.store import open_store

    summary = write_report(open_store(args.store, create=False), k=args.ensemble, out_dir=args.out)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    for line in report_lines(summary):
        print(line)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from evojax_nas.compare import compare

    result = compare(args.stores, labels=args.labels, out=args.out)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for warning in result.get("warnings", []):
            print(f"warning: {warning}")
        print(result["table"])
        print(f"plot: {result['plot']}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from evojax_nas.report import export_run
    from evojax_nas.store import open_store

    path = export_run(open_store(args.store, create=False), args.out, k=args.ensemble)
    print(f"wrote {path}; load it in Python with evojax_nas.load_model({args.out!r})")
    return 0


def run_adjust(args: argparse.Namespace) -> int:
    from evojax_nas.store import open_store

    control = adjust(
        open_store(args.store, create=False),
        mutations_per_child=args.mutations_per_child,
        for_minutes=args.for_minutes,
        reset_all_weights=args.reset_all_weights,
    )
    print(f"control of {args.store} is now {json.dumps(control, sort_keys=True)}")
    print("workers apply it at their next step; it is recorded in the run's history")
    return 0


def report_lines(s: dict[str, Any]) -> list[str]:
    """A short human-readable report."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    lines = [
        f"run               {s['store']} ({s['dataset']}, {s['selection']} selection"
        f"{'' if s['inheritance'] else ', no inheritance'}, seed {s['seed']})",
        f"trained           {s['individuals_trained']} individuals, {s['total_flops']:.3e} "
        f"FLOPs, {60 * s['wall_hours']:.1f} min wall time",
        f"best (validation) {s['best_id']}: validation {pct(s['best_val_accuracy'])}, "
        f"TEST {pct(s['best_test_accuracy'])}",
        f"  architecture    {s['best_architecture_detail']}",
        f"  paper notation  {s['best_architecture']}",
        f"ensemble top-{len(s['ensemble_ids'])}    TEST {pct(s['ensemble_test_accuracy'])} "
        f"(majority vote of {', '.join(s['ensemble_ids'])}; ties: larger summed probability)",
        f"note              {s['test_split']}",
    ]
    if len(s["ensemble_ids"]) < s["ensemble_k"]:
        lines.append(
            f"  (asked for top-{s['ensemble_k']}: only {len(s['ensemble_ids'])} individuals "
            "have stored weights)"
        )
    if s["progress_missing"]:
        lines.append(
            f"figure 2          {len(s['progress_missing'])} point(s) not measured: weights "
            f"garbage-collected before any report ({', '.join(s['progress_missing'])})"
        )
    lines += stall_lines(s.get("stall"))
    lines += [f"wrote             {p}" for p in s.get("outputs", {}).values()]
    return lines
