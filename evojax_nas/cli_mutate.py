"""`evojax-nas mutate`: apply one mutation to a DNA file and print what changed.

evojax-nas mutate --dna initial --seed 3 --mutation insert_convolution --out child.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import TYPE_CHECKING

from evojax_nas.cli_train import SAMPLES
from evojax_nas.errors import EvojaxNasError
from evojax_nas.mutation_names import MUTATION_NAMES

if TYPE_CHECKING:  # JAX is imported only when a command runs: `--help` stays fast
    from evojax_nas import dna as dna_lib
    from evojax_nas import mutations


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
    p.add_argument("--seed", type=int, required=True, help="seed of the mutation's key")
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
    print(mutate_file(args.dna, args.seed, args.out, mutation=args.mutation))
    return 0


def mutate_file(spec: str, seed: int, out: str, *, mutation: str | None = None) -> str:
    """Mutates the DNA named by `spec` with key `PRNGKey(seed)`, writes it to `out`.

    Returns:
        The human-readable summary of the change.

    Raises:
        DNAError: the input DNA is missing or malformed.
        MutationError: an unknown mutation, or one that cannot apply to this DNA.
        EvojaxNasError: `out` cannot be written.
    """
    import jax

    from evojax_nas import model, mutations
    from evojax_nas.cli_train import read_dna

    parent = read_dna(spec)
    key = jax.random.PRNGKey(seed)
    # Stand-in parent weights: only their shapes matter, to tell which tensors a child re-draws.
    variables = model.init_variables(parent, jax.random.fold_in(key, 3))
    weights = None if mutation is None else {mutation: 1.0}
    child, _, report = mutations.mutate(parent, variables, key, weights=weights)
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


def summarize(parent: dna_lib.DNA, child: dna_lib.DNA, report: mutations.MutationReport) -> str:
    """The `mutate` command's printout: mutation, IDs, architectures, numbers, tensors."""
    from evojax_nas import dna as dna_lib

    changes = dna_changes(parent, child) or ["(none)"]
    key_before, key_after = dna_lib.architecture_key(parent), dna_lib.architecture_key(child)
    lines = [
        f"mutation: {', '.join(report.names)}",
        f"touched IDs: {', '.join(map(str, report.touched)) or '(none)'}",
        f"before: {dna_lib.describe(parent)}",
        f"after:  {dna_lib.describe(child)}",
        "changes:",
        *(f"  {line}" for line in changes),
        f"architecture key: {key_before} → {key_after}"
        + (" (same: no recompile)" if key_before == key_after else ""),
        f"re-initialised tensors: {', '.join(report.reinitialised) or '(none)'}",
    ]
    return "\n".join(lines)
