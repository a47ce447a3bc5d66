"""`evojax-nas report`, `compare`, `export` and `adjust`: read a run, or steer a live one.

`adjust` is the paper's escape from local optima (§5, Figure 4): a period of a higher mutation
rate, or a population-wide weight reset. It writes the run's `control` meta (which every worker
reads at its next step) and appends the change to the run's `history`, drawn on Figure 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from evojax_nas.cli_common import STORE_HELP
from evojax_nas.stall import summary_lines as stall_lines


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
    from evojax_nas.app import adjust
    from evojax_nas.steering import Adjustment
    from evojax_nas.store import open_store

    change = Adjustment(args.mutations_per_child, args.for_minutes, args.reset_all_weights)
    control = adjust(open_store(args.store, create=False), change)
    print(f"control of {args.store} is now {json.dumps(control.to_json(), sort_keys=True)}")
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
