"""`evojax-nas mutate`: apply one mutation to a DNA file and print what changed.

evojax-nas mutate --dna initial --seed 3 --mutation insert_convolution --out child.json

The child is made by the run's own recipe (`evojax_nas.recipe.make_child`) with the event key
`event_key(seed, worker, event)`: it is the child that worker's event of a run with that seed
makes from this parent, when the run's plan is the one `--mutation` gives (one mutation; without
`--mutation`, the paper's uniform draw over all eleven, a default run's plan).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evojax_nas.cli_common import natural_int
from evojax_nas.cli_train import SAMPLES
from evojax_nas.errors import EvojaxNasError
from evojax_nas.mutation_names import MUTATION_NAMES

if TYPE_CHECKING:  # JAX is imported only when a command runs: `--help` stays fast
    import jax

    from evojax_nas import dna as dna_lib
    from evojax_nas.recipe import Plan


def add_mutate_command(subparsers) -> argparse.ArgumentParser:
    """Registers `mutate` on an `argparse` subparsers object; its handler is `run_mutate`."""
    p = subparsers.add_parser(
        "mutate",
        help="apply one mutation to a DNA and print what changed",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--dna", required=True, help="DNA JSON file, 'initial' or a sample: " + ", ".join(SAMPLES)
    )
    p.add_argument(
        "--seed",
        type=int,
        required=True,
        help="run seed: the key is that of worker --worker's event --event in a run with it",
    )
    p.add_argument("--worker", type=natural_int, default=0, help="worker of the event key (0)")
    p.add_argument(
        "--event",
        type=natural_int,
        default=0,
        help="event number of the event key (0)",
    )
    p.add_argument(
        "--mutation",
        choices=sorted(MUTATION_NAMES),
        default=None,
        help="the mutation to apply (default: drawn uniformly, redrawn if it cannot apply)",
    )
    p.add_argument("--out", required=True, help="where to write the child's DNA JSON")
    p.set_defaults(handler=run_mutate)
    return p


add_command = add_mutate_command  # the name `cli.py` looks for in its command modules


def run_mutate(args: argparse.Namespace) -> int:
    """Handler of `evojax-nas mutate`: writes the child and prints the summary."""
    text = mutate_file(
        args.dna, args.seed, args.out, mutation=args.mutation, worker=args.worker, event=args.event
    )
    print(text)
    return 0


def mutation_plan(mutation: str | None) -> Plan:
    """The plan of `mutate --mutation NAME`: that one mutation (None: one drawn uniformly, as a
    default run draws it), weights inherited."""
    from evojax_nas.recipe import Plan

    return Plan(weights=None if mutation is None else {mutation: 1.0}, count=1, inherit=True)


def mutant(
    parent: dna_lib.DNA, key: jax.Array, mutation: str | None = None, params: Any = None
) -> tuple[dna_lib.DNA, Any, dict]:
    """The child `make_child` makes from `parent` with event key `key` and `mutation_plan`.

    Args:
        params: the parent's variables; None gives it stand-in variables drawn from the same
            event key as an initial individual's (`recipe.initial_variables`): `mutate` has
            no weights, and only their shapes decide which tensors the child re-draws.

    Returns:
        (the child's DNA, its variables, the record's `mutation` dict), as `make_child`.
    """
    from evojax_nas.recipe import initial_variables, make_child

    if params is None:
        params = initial_variables(key, parent)
    return make_child(key, parent, params, mutation_plan(mutation))


def mutate_file(
    spec: str,
    seed: int,
    out: str,
    *,
    mutation: str | None = None,
    worker: int = 0,
    event: int = 0,
) -> str:
    """Mutates the DNA named by `spec` with the event key `event_key(seed, worker, event)`
    (see `mutant`) and writes the child to `out`.

    Returns:
        The human-readable summary of the change.

    Raises:
        DNAError: the input DNA is missing or malformed.
        MutationError: an unknown mutation, or one that cannot apply to this DNA.
        EvojaxNasError: `out` cannot be written.
    """
    from evojax_nas.cli_train import read_dna
    from evojax_nas.keys import event_key

    parent = read_dna(spec)
    child, _, report = mutant(parent, event_key(seed, worker, event), mutation)
    write_dna(child, out)
    return summarize(parent, child, report) + f"\nwrote {out}"


def write_dna(dna: dna_lib.DNA, path: str) -> None:
    """Writes a DNA as JSON through a temporary file, so a reader never sees half of it."""
    from evojax_nas import dna as dna_lib

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dna_lib.to_json(dna) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise EvojaxNasError(f"cannot write the child DNA to {path}: {exc.strerror}") from None


def _edge_text(e: dna_lib.Edge) -> str:
    kind = e.kind if not e.is_skip else f"{e.kind} skip"
    text = f"edge {e.id}: {e.src}→{e.dst} {kind}"
    if e.is_conv:
        h, w = e.filter_shape
        text += f" {h}x{w} stride {2**e.stride_log2} depth_factor {e.depth_factor:.4g}"
    return text


def dna_changes(parent: dna_lib.DNA, child: dna_lib.DNA) -> list[str]:
    """One line per added, removed or changed vertex or edge, and per changed number."""
    lines = []
    if child.learning_rate != parent.learning_rate:
        lines.append(f"learning_rate: {parent.learning_rate!r} → {child.learning_rate!r}")
    for kind, old, new in (
        ("vertex", {v.id: v for v in parent.vertices}, {v.id: v for v in child.vertices}),
        ("edge", {e.id: e for e in parent.edges}, {e.id: e for e in child.edges}),
    ):
        for i in sorted(old.keys() - new.keys()):
            lines.append(f"- {_edge_text(old[i]) if kind == 'edge' else _vertex_text(old[i])}")
        for i in sorted(new.keys() - old.keys()):
            lines.append(f"+ {_edge_text(new[i]) if kind == 'edge' else _vertex_text(new[i])}")
        for i in sorted(old.keys() & new.keys()):
            a, b = dataclasses.asdict(old[i]), dataclasses.asdict(new[i])
            for field in a:
                if a[field] != b[field]:
                    lines.append(f"~ {kind} {i} {field}: {a[field]!r} → {b[field]!r}")
    return lines


def _vertex_text(v: dna_lib.Vertex) -> str:
    return f"vertex {v.id} ({v.kind}, {v.role})"


def summarize(parent: dna_lib.DNA, child: dna_lib.DNA, report: Mapping[str, Any]) -> str:
    """The `mutate` command's printout: mutation, IDs, architectures, numbers, tensors.

    Args:
        report: the record's `mutation` dict (`names`, `touched`, `reinitialised`).
    """
    from evojax_nas import dna as dna_lib

    changes = dna_changes(parent, child) or ["(none)"]
    key_before, key_after = dna_lib.architecture_key(parent), dna_lib.architecture_key(child)
    lines = [
        f"mutation: {', '.join(report['names'])}",
        f"touched IDs: {', '.join(map(str, report['touched'])) or '(none)'}",
        f"before: {dna_lib.describe(parent)}",
        f"after:  {dna_lib.describe(child)}",
        "changes:",
        *(f"  {line}" for line in changes),
        f"architecture key: {key_before} → {key_after}"
        + (" (same: no recompile)" if key_before == key_after else ""),
        f"re-initialised tensors: {', '.join(report['reinitialised']) or '(none)'}",
    ]
    return "\n".join(lines)
