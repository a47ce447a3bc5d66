"""The package's import graph has no circle and runs one way: CLI → application → core → store.

Every import counts, including those inside functions (they are the lazy ones that keep light
commands fast, and a circle through them is a circle all the same).
"""

import ast
import pathlib
import subprocess
import sys

import pytest

import evojax_nas

PACKAGE = pathlib.Path(evojax_nas.__file__).parent
BASE = {"errors", "hints", "mutation_names", "state"}  # plain Python: any layer may use them
APPLICATION = {"app", "runner", "progress", "report", "compare"}
HEAVY = ("jax", "flax", "optax", "matplotlib")  # what the store must never import


def layer(module: str) -> int:
    """0 base, 1 store, 2 core, 3 application, 4 CLI."""
    name = module.removeprefix("evojax_nas.")
    if name in BASE:
        return 0
    if name == "store" or name.startswith("store."):
        return 1
    if name == "cli" or name.startswith("cli_"):
        return 4
    return 3 if name in APPLICATION else 2


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: pathlib.Path, known: dict) -> tuple[set[str], set[str]]:
    """(package modules, top-level third-party names) that the file imports anywhere."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in known] or [node.module]
        else:
            continue
        for name in names:
            if name in known:
                ours.add(name)
            elif name.split(".")[0] != "evojax_nas":
                theirs.add(name.split(".")[0])
    return ours, theirs


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def test_no_import_circle(graph):
    edges = {m: {d for d in ours if d != m} for m, (ours, _) in graph.items() if m != "evojax_nas"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                pytest.fail("import circle: " + " → ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_imports_run_one_way(graph):
    wrong = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, (ours, _) in sorted(graph.items())
        if m != "evojax_nas"
        for d in sorted(ours)
        if d != "evojax_nas" and layer(d) > layer(m)
    ]
    assert not wrong, "imports against CLI → application → core → store:\n" + "\n".join(wrong)


def test_the_store_imports_nothing_of_jax(graph):
    heavy = {m: theirs & set(HEAVY) for m, (_, theirs) in graph.items() if layer(m) <= 1}
    assert not any(heavy.values()), heavy
    code = (
        "import sys, evojax_nas.store, evojax_nas.state, evojax_nas.app\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layering_check_would_catch_a_wrong_way_import():
    assert layer("evojax_nas.store.local") < layer("evojax_nas.evolution") < layer("evojax_nas.app")
    assert layer("evojax_nas.app") < layer("evojax_nas.cli_evolve")
    assert layer("evojax_nas.errors") == 0


def test_the_code_digest_covers_what_programs_are_traced_from(graph):
    """`programs.CODE_MODULES` (hashed into every shared program's key) is `programs` and what
    it imports, transitively: an edit to any of them makes a run's shared programs stale."""
    from evojax_nas.programs import CODE_MODULES

    closure, todo = set(), ["evojax_nas.programs"]
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(graph[name][0])
    assert {f"evojax_nas.{m}" for m in CODE_MODULES} == closure
